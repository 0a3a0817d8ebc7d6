"""Loading tokenizers and models (the toy model, any transformers checkpoint, or a LoRA adapter folder): causal LMs,
reward and value models; LoRA adapters (peft) on a model, and the reference as the model with its adapters off;
scoring text with a reward model."""

import copy
import importlib.util
import json
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

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


@dataclass
class LoraArgs:
    """LoRA adapters (Hu et al. 2021) through peft, a script's --lora.* flags: the trained model's weights stay as they
    are and each targeted linear layer learns a low-rank update (alpha / r) * B A; the reference is the same model
    with its adapters off."""

    r: int = 0
    """rank of the adapters; 0: no adapters, every weight trains"""
    alpha: float = 16.0
    """scale of the adapters' update: alpha / r"""
    dropout: float = 0.0
    """dropout on the adapters' input"""
    target_modules: str = "all-linear"
    """linear layers that get adapters: all-linear (every linear layer of the decoder) or names, comma-separated (e.g.
    q_proj,v_proj)"""
    merge: bool = True
    """also save the model with the adapters merged into its weights, which from_pretrained loads as it is (on by
    default; the adapters alone go to output_dir/adapter either way)"""


def add_lora(model, lora: LoraArgs, model_name_or_path: str, modules_to_save: list[str] | None = None):
    """The model with LoRA adapters on its target layers (peft), only they and modules_to_save (a head trained in full:
    a reward or value model's score) trainable; the model itself where lora.r is 0. The adapters record
    model_name_or_path as their base, the folder that this module's loaders read them back with."""
    if lora.r == 0:
        return model
    from peft import LoraConfig

    targets = lora.target_modules if lora.target_modules == "all-linear" else lora.target_modules.split(",")
    linear = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets != "all-linear" and not set(targets) <= set(linear):
        missing = sorted(set(targets) - set(linear))
        fail(
            f"--lora.target_modules {lora.target_modules}: no layer {missing} here; the model's linear layers: {linear}"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
    )
    model = add_lora_config(model, config)
    model.peft_config["default"].base_model_name_or_path = model_name_or_path
    return model


def add_lora_config(model, config):
    """peft's get_peft_model on a copy of the config (it rewrites the config's base_model_name_or_path)."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, copy.deepcopy(config))


@contextmanager
def quiet_peft():
    """peft 0.21 calls a transformers method that transformers 5.25 deprecated, and says when it renames the config's
    base model: warnings that ask nothing of a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed.*")
        yield


@contextmanager
def adapters_off(model):
    """The model as the reference, in eval mode: with LoRA adapters, the trained model with them disabled (the initial
    model, and no second copy of its weights); a model without adapters as it is."""
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        model.train(was_training)


def adapter_config(path: str) -> dict | None:
    """A LoRA adapter folder's adapter_config.json (its base model, its modules_to_save); None for another folder."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    config = json.load(open(file))
    if not config.get("base_model_name_or_path"):
        fail(f"LoRA adapter folder '{path}': its adapter_config.json names no base_model_name_or_path")
    return config


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter folder; None for another folder."""
    config = adapter_config(path)
    return config and config["base_model_name_or_path"]


def has_score_head(path: str) -> bool:
    """Whether a LoRA adapter folder's adapters carry a score head (a reward or value model's)."""
    return "score" in (adapter_config(path).get("modules_to_save") or [])


def from_base(load, path: str, *args, **kwargs):
    """`load` (a loader of this module) of a LoRA adapter folder's base; one line where it cannot be loaded."""
    base = adapter_base(path)
    try:
        return load(base, *args, **kwargs)
    except SystemExit as e:
        reason = str(e).removeprefix("error: ")
        fail(f"LoRA adapter folder '{path}': its base model '{base}' cannot be loaded ({reason})")


def merged_adapters(load, path: str, *args, **kwargs):
    """A LoRA adapter folder's model: its base, loaded by `load` (one of this module's loaders), with the adapters
    merged into its weights, so that it trains and serves as the model it is, and is the reference as it is."""
    from peft import PeftModel

    model = from_base(load, path, *args, **kwargs)
    with quiet_peft():
        return PeftModel.from_pretrained(model, path).merge_and_unload()


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
    if adapter_base(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return from_base(load_tokenizer, path)  # an adapter folder saved without a tokenizer: its base's
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
    if adapter_base(model_name_or_path):
        model = merged_adapters(load_causal_lm, model_name_or_path, tokenizer, device)
    elif model_name_or_path == "toy":
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
    if adapter_base(model_name_or_path):  # its base is the causal LM the reward model was trained from
        if not from_causal_lm and not has_score_head(model_name_or_path):
            fail(f"'{model_name_or_path}' holds LoRA adapters without a score head: not a reward model's adapters")
        model = merged_adapters(load_reward_model, model_name_or_path, tokenizer, device, from_causal_lm=True)
    elif model_name_or_path == "toy":
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
    if adapter_base(model_name_or_path):  # a LoRA adapter folder: the value model of its merged model
        with tempfile.TemporaryDirectory() as merged:
            if has_score_head(model_name_or_path):  # a reward model's adapters: it keeps their trained head
                model = load_reward_model(model_name_or_path, tokenizer, torch.device("cpu"))
            else:
                model = load_causal_lm(model_name_or_path, tokenizer, torch.device("cpu"))
            model.save_pretrained(merged)
            return load_value_model(merged, tokenizer, device, gradient_checkpointing)
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
