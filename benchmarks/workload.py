"""The benchmark's one fixed CPU workload, built deterministically into a folder (default benchmarks/.work/):

    config.json, model.safetensors, tokenizer files   a ~7M-parameter Llama (random init, seed 0) and a
        byte-level BPE tokenizer (8192 tokens) trained on the HH-RLHF harmless-base test dialogues; one folder,
        so `--model_name_or_path <folder>` works for our scripts and for TRL
    pairwise.jsonl   512 HH pairs: prompt (the dialogue up to and including the last "\\n\\nAssistant:"), chosen,
                     rejected
    sft.jsonl        the same 512 as prompt, completion (= chosen)
    pointwise.jsonl  the same 512 pairs unpaired: prompt, completion, label (chosen true, rejected false), 1024 rows
    rm/              the online annotator (online_dpo, grpo, rloo, ppo): the same Llama and tokenizer with a one-output
        sequence-classification head (LlamaForSequenceClassification, num_labels=1), random init with seed 1,
        so its rewards are continuous and two samples practically never tie

Only pairs that need no truncation (prompt <= MAX_PROMPT_LENGTH tokens, prompt + response + EOS <= MAX_LENGTH)
and tokenize the same with prompt and response apart as together are kept, so both sides train on exactly the
same tokens whatever their truncation rules and however they tokenize.

    python benchmarks/workload.py [--data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz] [--out benchmarks/.work]
"""

import argparse
import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
WORK = Path(__file__).resolve().parent / ".work"
NUM_PAIRS, MAX_LENGTH, MAX_PROMPT_LENGTH, BATCH_SIZE = 512, 256, 128, 8  # fp32 throughout
MAX_NEW_TOKENS, TEMPERATURE = 64, 1.0  # online pairs: sampled responses (prompt + response <= 128 + 64 < MAX_LENGTH)
NUM_SAMPLES, KL_COEF = 4, 0.05  # grpo, rloo: samples per prompt (a step: 4 prompts x 4 = 16 responses); KL weight
VOCAB_SIZE, SEED, REWARD_MODEL_SEED = 8192, 0, 1
ASSISTANT = "\n\nAssistant:"


def train_tokenizer(dialogues: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(dialogues, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def model_config(tokenizer, **kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def make_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    return LlamaForCausalLM(model_config(tokenizer))


def build_reward_model(out: Path = WORK):
    """out/rm: a random-init reward model (one output) on the workload's architecture and tokenizer. Both sides
    of online_dpo read rewards where transformers reads them: at the last token that is not padding."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    torch.manual_seed(REWARD_MODEL_SEED)
    model = LlamaForSequenceClassification(model_config(tokenizer, num_labels=1))
    tokenizer.save_pretrained(out / "rm")
    model.save_pretrained(out / "rm")


def select_pairs(rows: list[dict], tokenizer) -> list[dict]:
    """The first NUM_PAIRS rows (file order) that split into prompt/chosen/rejected, need no truncation and
    tokenize the same with prompt and response apart as together."""
    pairs = []
    for row in rows:
        cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
        prompt, chosen, rejected = row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:]
        if (
            cut < len(ASSISTANT)
            or row["rejected"][:cut] != prompt
            or not chosen.strip()
            or not rejected.strip()
            or chosen == rejected
        ):
            continue
        prompt_ids = tokenizer(prompt)["input_ids"]
        together = [tokenizer(prompt + response)["input_ids"] for response in (chosen, rejected)]
        apart = [prompt_ids + tokenizer(response)["input_ids"] for response in (chosen, rejected)]
        if (
            len(prompt_ids) <= MAX_PROMPT_LENGTH and max(map(len, together)) < MAX_LENGTH and together == apart
        ):  # < : room for EOS
            pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
        if len(pairs) == NUM_PAIRS:
            return pairs
    raise SystemExit(f"only {len(pairs)} of {len(rows)} rows fit in {MAX_LENGTH} tokens; need {NUM_PAIRS}")


def build_pointwise(out: Path = WORK):
    """out/pointwise.jsonl: each pair of pairwise.jsonl as two labelled examples (KTO's unpaired form)."""
    pairs = [json.loads(line) for line in open(out / "pairwise.jsonl")]
    write_jsonl(
        out / "pointwise.jsonl",
        [dict(prompt=p["prompt"], completion=p[k], label=k == "chosen") for p in pairs for k in ("chosen", "rejected")],
    )


def write_jsonl(path: Path, rows: list[dict]):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def build(out: Path = WORK, data: Path = DATA):
    rows = [json.loads(line) for line in gzip.open(data, "rt")]
    tokenizer = train_tokenizer([row[k] for row in rows for k in ("chosen", "rejected")])
    model = make_model(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    pairs = select_pairs(rows, tokenizer)
    write_jsonl(out / "sft.jsonl", [dict(prompt=p["prompt"], completion=p["chosen"]) for p in pairs])
    build_reward_model(out)
    write_jsonl(out / "pairwise.jsonl", pairs)  # written last: its presence means the folder is complete
    build_pointwise(out)
    print(
        f"workload in {out}: {model.num_parameters() / 1e6:.2f}M-parameter Llama, {len(tokenizer)}-token BPE, "
        f"{len(pairs)} pairs (max_length {MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the HH-RLHF jsonl.gz to train the tokenizer on and take pairs from"
    )
    parser.add_argument("--out", type=Path, default=WORK, help="folder to build the workload in")
    args = parser.parse_args()
    build(args.out, args.data)
