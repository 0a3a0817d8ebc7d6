"""Peak memory of online DPO on the CPU with a ~100M-parameter Llama, LoRA (--lora.r 16) against full fine-tuning.

Full fine-tuning holds the policy, its gradients, AdamW's two moments and a reference copy of the policy; LoRA holds
the policy and its adapters' few gradients and moments, and takes the reference from the policy itself with its
adapters off. Both sides run `dpo_pairwise.py --online` on the benchmark workload's HH prompts, tokenizer and reward
model (benchmarks/workload.py) for a few steps, in a subprocess each, measured by GNU time (peak RSS, as run.py does).

    python benchmarks/lora_memory.py [--repeats 1] [--threads 2] [--gradient_checkpointing] [--glibc_default]

What LoRA saves is the state that grows with the parameters (gradients, AdamW's moments, the reference copy: 16 bytes
a parameter in fp32); the activations of a batch stay, so the ratio depends on the batch: with
--gradient_checkpointing (both sides) they shrink to each layer's input.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import workload
from run import timed

MODEL = workload.WORK / "llama-100m"


def build_model(work: Path) -> Path:
    """A Llama of about 100M parameters (hidden 768, 10 layers, MLP 3072, tied embeddings) with the workload's
    tokenizer, random init (seed 0), written once."""
    if (MODEL / "model.safetensors").exists():
        return MODEL
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokenizer.save_pretrained(MODEL)
    model.save_pretrained(MODEL)
    return MODEL


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (the peak is their largest)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run")
    parser.add_argument("--glibc_default", action="store_true", help="glibc's default heap (see the comment)")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="both sides recompute activations in the backward"
    )
    args = parser.parse_args()
    work = workload.WORK
    if not (work / "rm" / "model.safetensors").exists():
        workload.build(work)
    model = build_model(work)
    with torch.device("meta"):
        parameters = LlamaForCausalLM(LlamaConfig.from_pretrained(model)).num_parameters()
    # glibc keeps the heap memory that freed tensors leave (its fragments): a process's peak RSS then records the
    # allocator's history more than the tensors alive at the peak. With large blocks mmap-ed they go back on free,
    # so both sides' peak RSS is closer to their peak live memory (the default allocator: --glibc_default).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    if not args.glibc_default:
        env |= dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, "dpo_pairwise.py", "--online", "--model_name_or_path", str(model)]
    command += ["--dataset", str(work / "pairwise.jsonl"), "--annotator", f"reward_model:{work / 'rm'}"]
    command += ["--max_steps", str(args.steps), "--per_device_batch_size", "8", "--generation.max_new_tokens", "32"]
    command += ["--eval.num_prompts", "0", "--eval_every", "1000", "--max_prompt_length", "128"]
    command += ["--gradient_checkpointing"] * args.gradient_checkpointing
    peaks = {}
    for side, extra in (("full fine-tuning", []), ("LoRA r=16", ["--lora.r", "16"])):
        for repeat in range(args.repeats):
            wall, _, peak, _ = timed(command + extra, work / "runs" / f"lora-memory-{repeat}", env)
            peaks[side] = max(peaks.get(side, 0), peak)
            print(f"{side}: peak RSS {peak:.0f} MiB, {wall:.1f} s for {args.steps} steps", flush=True)
    ratio = peaks["LoRA r=16"] / peaks["full fine-tuning"]
    print(f"LoRA r=16 / full fine-tuning, peak RSS: {ratio:.2f} (a Llama of {parameters / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
