"""Loading tokenizers and models (the toy model or any transformers checkpoint): causal LMs, reward and value models;
scoring text with a reward model; storing reference log-probs."""

import importlib.util
import math

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from common import toy
from common.batch import collate, tokenize_records
from common.flags import fail


def attn_implementation(device: torch.device) -> str:
    """flash-attn when it is installed and we are on CUDA, else torch's scaled_dot_product_attention."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def checkpoint_activations(model):
    """Recompute each layer's activations in the backward pass (--gradient_checkpointing). transformers 5.23 renamed
    the switch (activation_checkpointing_enable; the old name warns); earlier versions have only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_tokenizer(model_name_or_path: str):
    path = toy.TOKENIZER_DIR if model_name_or_path == "toy" else model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(
            f"model '{model_name_or_path}' not found: not a local folder with a tokenizer, nor loadable from the hub "
            f"({str(e).splitlines()[0]})"
        )
    if tokenizer.pad_token is None:  # padding is masked out; prefer a token that is not EOS (see load_reward_model)
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_name_or_path: str, tokenizer, device: torch.device, gradient_checkpointing: bool = False):
    """fp32 weights (the FSDP2 master copy; compute is bf16 on CUDA). `toy` is a random tiny Llama, the
    same every time it is made (so a reference model made later equals the initial policy)."""
    attn = attn_implementation(device)
    if model_name_or_path == "toy":
        with torch.random.fork_rng(devices=[]):  # built on the CPU
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(toy.toy_config(tokenizer), attn_implementation=attn)
    else:
        try:
            architectures = AutoConfig.from_pretrained(model_name_or_path).architectures or []
            model = AutoModelForCausalLM.from_pretrained(
                model_name_or_path, dtype=torch.float32, attn_implementation=attn
            )
        except (OSError, ValueError) as e:
            fail(f"model '{model_name_or_path}' could not be loaded as a causal LM ({str(e).splitlines()[0]})")
        if any(a.endswith("ForSequenceClassification") for a in architectures):  # it would load, with a new LM head
            fail(
                f"'{model_name_or_path}' is a sequence-classification model (a reward model: {architectures}), not a "
                "causal LM; pass the causal LM to train or judge with (e.g. the SFT model), and a reward model as "
                "--annotator reward_model:PATH"
            )
    if gradient_checkpointing:
        checkpoint_activations(model)
    model.config.use_cache = False  # training forwards; generation passes its own cache
    return model


def load_reward_model(
    model_name_or_path: str,
    tokenizer,
    device: torch.device,
    from_causal_lm: bool = False,
    gradient_checkpointing: bool = False,
):
    """A sequence-classification model with one output: the reward. With from_causal_lm, a causal-LM
    checkpoint (or `toy`) gets a fresh score head, to be trained by reward_model.py.

    The reward is read where transformers reads it: at the last token that is not padding. So config.pad_token_id
    is the tokenizer's pad; where a tokenizer pads with EOS, the final EOS counts as padding and the reward
    is read at the last response token, the same way in training and whenever the saved model is used."""
    attn = attn_implementation(device)
    if model_name_or_path == "toy":
        config = toy.toy_config(tokenizer)
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):  # built on the CPU
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    else:
        try:
            config = AutoConfig.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as e:
            fail(f"reward model '{model_name_or_path}' not found ({str(e).splitlines()[0]})")
        architectures = config.architectures or []
        if not from_causal_lm and not any(a.endswith("ForSequenceClassification") for a in architectures):
            fail(
                f"'{model_name_or_path}' is not a sequence-classification model (architectures: {architectures}); "
                "train one with reward_model.py or pass an AutoModelForSequenceClassification checkpoint"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, num_labels=1, dtype=torch.float32, attn_implementation=attn
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        checkpoint_activations(model)
    model.config.use_cache = False
    return model


def load_value_model(model_name_or_path: str, tokenizer, device: torch.device, gradient_checkpointing: bool = False):
    """A transformer body with a scalar head at every position (a token-classification model with one label, no
    dropout): V(x, y_<t). From a reward model (reward_model.py's output, or any sequence-classification model) it
    keeps the body and the score head, so each position starts at the reward model's score of the text so far;
    from a causal LM (or `toy`) the head is new, drawn with std 1/sqrt(hidden + 1) (the N+ implementation
    details of RLHF with PPO, Huang et al. 2024) and no bias."""
    attn = attn_implementation(device)
    path = toy.toy_config(tokenizer) if model_name_or_path == "toy" else model_name_or_path
    try:
        config = path if model_name_or_path == "toy" else AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"value model '{model_name_or_path}' not found ({str(e).splitlines()[0]})")
    config.num_labels, config.classifier_dropout, config.token_classification_bias = 1, 0.0, False
    with torch.random.fork_rng(devices=[]):  # a new head is the same every time (built on the CPU)
        torch.manual_seed(0)
        if model_name_or_path == "toy":
            model = AutoModelForTokenClassification.from_config(config, attn_implementation=attn)
        else:
            model = AutoModelForTokenClassification.from_pretrained(
                path, config=config, dtype=torch.float32, attn_implementation=attn
            )
        from_reward_model = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        if not from_reward_model:
            torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    if gradient_checkpointing:
        checkpoint_activations(model)
    model.config.use_cache = False
    return model


@torch.no_grad()
def reward_scores(
    model, tokenizer, prompts: list, responses: list[str], max_length: int = 1024, batch_size: int = 16
) -> torch.Tensor:
    """Score (prompt, response) texts with a reward model, using its own tokenizer (and chat template, for
    message prompts), minus the mean reward recorded at training time (config.reward_mean, if centred).
    The same tokenization as training: prompt and response tokenized apart, EOS appended. (N,) float."""
    device = next(model.parameters()).device
    records = [{"prompt": p, "generation1": r} for p, r in zip(prompts, responses)]
    rows = tokenize_records(records, tokenizer, max_length, max_length // 2)
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
        out = model(
            input_ids=batch["generation1_token_ids"].to(device),
            attention_mask=batch["generation1_attention_mask"].to(device),
        )
        scores.append(out.logits[:, 0].float().cpu())
    return torch.cat(scores) - getattr(model.config, "reward_mean", 0.0)
