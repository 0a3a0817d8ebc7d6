"""Loading tokenizers and causal LMs (the toy model or any transformers checkpoint) and log-prob gathering."""

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import toy
from common.distributed import fail


def attn_implementation(device: torch.device) -> str:
    """flash-attn when it is installed and we are on CUDA, else torch's scaled_dot_product_attention."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model_name_or_path: str):
    path = toy.TOKENIZER_DIR if model_name_or_path == "toy" else model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"model '{model_name_or_path}' not found: not a local folder with a tokenizer, nor loadable from the hub ({str(e).splitlines()[0]})")
    if tokenizer.pad_token is None:  # padding is always masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_name_or_path: str, tokenizer, device: torch.device, gradient_checkpointing: bool = False):
    """fp32 weights (the FSDP2 master copy; compute is bf16 on CUDA). `toy` is a fresh random tiny Llama."""
    attn = attn_implementation(device)
    if model_name_or_path == "toy":
        model = AutoModelForCausalLM.from_config(toy.toy_config(tokenizer), attn_implementation=attn)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32, attn_implementation=attn)
        except (OSError, ValueError) as e:
            fail(f"model '{model_name_or_path}' could not be loaded as a causal LM ({str(e).splitlines()[0]})")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forwards; generation passes its own cache
    return model


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """log pi(y_t | x, y_<t) for every response token: (B, K) tensor, zero outside the response, and the
    (B, K) response mask, where K counts positions from the batch's first response token on. The LM head
    runs only on those positions, not on the prompts."""
    first = max(int(response_mask.float().argmax(-1).min()), 1)  # earliest response token in the batch
    keep = input_ids.shape[1] - first + 1  # logits at positions first-1 .. T-1 (the last one is unused)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]  # (B, K, V)
    labels, mask = input_ids[:, first:], response_mask[:, first:]
    logps = -F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")  # (B, K)
    return logps * mask, mask
