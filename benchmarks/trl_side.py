"""The TRL side of the benchmark: one TRL trainer on the same files and settings as our script.

    python benchmarks/trl_side.py sft --model_name_or_path W --dataset W/sft.jsonl --max_steps 36 --output_dir D

The flags are our scripts' names for the same things. TRL gets its defaults except where they would make the
two sides do different work: fp32 (TRL defaults to bf16), no gradient checkpointing (TRL defaults to on, ours
to off), our seed and learning-rate schedule (20 warmup steps, then cosine), no checkpoints, no logging
until the end. The model is given as the folder, as in a normal TRL run, so TRL loads it: a causal LM for SFT,
DPO and KTO (DPO and KTO load a second copy as the reference and run it every step: precompute_ref_log_probs=False
is TRL's default), a sequence-classification head (num_labels=1, random init) on the same LM for the reward model.
KTO reads the pairs unpaired (pointwise.jsonl: prompt, completion, label).

online_dpo is TRL's experimental OnlineDPOTrainer on the prompts of the pairwise file, sampling with transformers'
`generate` (not vLLM) and scored by the reward model given as `--annotator reward_model:PATH` (our flag). Its
generation is timed from outside, by wrapping the trainer's `_generate` (prompt tokenization, `generate`, cutting
after EOS), and the totals go to <output_dir>/generation.json: the only instrumentation, a clock read per step.

grpo and rloo are GRPOTrainer and RLOOTrainer the same way (prompts, reward model, `generate`), with our rl_ppo.py
flags: --num_samples (num_generations), --kl_coef (beta), --num_ppo_epochs (num_iterations), --num_minibatches
(steps_per_generation: optimizer steps per generation batch; --per_device_batch_size is per_device_train_batch_size,
completions per optimizer step). GRPO: loss_type "grpo" (each completion's token mean, then the mean over
completions) and scale_rewards "group", as rl_ppo.py --estimator grpo. Their generation is timed around
`_generate_single_turn` (`generate` on the tokenized prompts, cutting after EOS), the method that samples.
"""

import argparse
import json
import os
import time

from datasets import load_dataset
from transformers import AutoTokenizer
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)

TRAINERS = {
    "sft": (SFTConfig, SFTTrainer),
    "reward_model": (RewardConfig, RewardTrainer),
    "dpo": (DPOConfig, DPOTrainer),
    "kto": (KTOConfig, KTOTrainer),
    "grpo": (GRPOConfig, GRPOTrainer),
    "rloo": (RLOOConfig, RLOOTrainer),
}
ONLINE = ("online_dpo", "grpo", "rloo")  # sample from the policy, scored by --annotator

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("trainer", choices=[*TRAINERS, "online_dpo"])
parser.add_argument("--model_name_or_path", required=True, help="folder with the model and its tokenizer")
parser.add_argument("--dataset", required=True, help="local .jsonl: prompt/completion (sft) or prompt/chosen/rejected")
parser.add_argument("--output_dir", required=True, help="TRL's output folder (nothing is saved in it)")
parser.add_argument("--max_steps", type=int, required=True, help="optimizer steps")
parser.add_argument("--seed", type=int, default=1, help="seed (ours defaults to 1)")
parser.add_argument(
    "--per_device_batch_size", type=int, default=8, help="examples (pairs; grpo, rloo: completions) per step"
)
parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
parser.add_argument(
    "--max_length", type=int, default=256, help="longest prompt + response in tokens (grpo, rloo: no such setting)"
)
parser.add_argument("--warmup_steps", type=int, default=20, help="linear warmup steps, then cosine decay to 0")
parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
parser.add_argument(
    "--annotator", default=None, help="online pairs: reward_model:PATH, the reward model scoring the samples"
)
parser.add_argument(
    "--generation.max_new_tokens",
    dest="max_new_tokens",
    type=int,
    default=64,
    help="online pairs: longest sampled response in tokens",
)
parser.add_argument(
    "--generation.temperature", dest="temperature", type=float, default=1.0, help="online pairs: sampling temperature"
)
parser.add_argument("--num_samples", type=int, default=4, help="grpo, rloo: completions per prompt (num_generations)")
parser.add_argument("--kl_coef", type=float, default=0.05, help="grpo, rloo: weight of the KL to the reference (beta)")
parser.add_argument("--num_ppo_epochs", type=int, default=1, help="grpo, rloo: passes over a generation batch")
parser.add_argument(
    "--num_minibatches", type=int, default=1, help="grpo, rloo: optimizer steps per pass (steps_per_generation)"
)
args = parser.parse_args()

if args.trainer == "online_dpo":  # imported only when chosen: trl.experimental warns on import
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    config_class, trainer_class = OnlineDPOConfig, OnlineDPOTrainer
else:
    config_class, trainer_class = TRAINERS[args.trainer]
group = {  # grpo, rloo: one generation batch of per_device_batch_size * num_minibatches completions
    "num_generations": args.num_samples,
    "beta": args.kl_coef,  # > 0: the reference model is loaded and run every step, as ours
    "num_iterations": args.num_ppo_epochs,
    "steps_per_generation": args.num_minibatches,
    "max_completion_length": args.max_new_tokens,
    "temperature": args.temperature,  # top_p 1, top_k 0 (off): TRL's defaults and ours
    "use_vllm": False,
}
method = {
    "sft": {"completion_only_loss": True, "max_length": args.max_length},
    "reward_model": {"max_length": args.max_length},
    "dpo": {"beta": args.beta, "loss_type": ["sigmoid"], "max_length": args.max_length},
    # desirable_weight = undesirable_weight = 1, TRL's defaults and ours
    "kto": {"beta": args.beta, "max_length": args.max_length},
    "online_dpo": {
        "beta": args.beta,
        "loss_type": "sigmoid",
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "use_vllm": False,
        "max_length": args.max_length,
    },
    "grpo": group | {"loss_type": "grpo", "scale_rewards": "group"},
    "rloo": group,  # the KL (k1, summed over the completion) in the reward; advantages not normalised
}[args.trainer]
config = config_class(
    output_dir=args.output_dir,
    max_steps=args.max_steps,
    seed=args.seed,
    per_device_train_batch_size=args.per_device_batch_size,
    learning_rate=args.learning_rate,
    lr_scheduler_type="cosine",
    warmup_steps=args.warmup_steps,
    bf16=False,
    activation_checkpointing=False,
    model_init_kwargs={"dtype": "float32"},
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    logging_steps=args.max_steps,
    **method,
)
train_dataset = load_dataset("json", data_files=args.dataset, split="train")
if args.trainer not in ONLINE:
    trainer_class(model=args.model_name_or_path, args=config, train_dataset=train_dataset).train()
    raise SystemExit

kind, _, reward_model = (args.annotator or "").partition(":")
if kind != "reward_model" or not reward_model:
    parser.error(f"{args.trainer} needs --annotator reward_model:PATH")
trainer = trainer_class(
    model=args.model_name_or_path,
    reward_funcs=reward_model,
    args=config,
    train_dataset=train_dataset.select_columns(["prompt"]),
    processing_class=AutoTokenizer.from_pretrained(args.model_name_or_path),
)
totals = {"calls": 0, "responses": 0, "generated_tokens": 0, "eos": 0, "generation_seconds": 0.0, "longest": 0}
name = "_generate" if args.trainer == "online_dpo" else "_generate_single_turn"
generate = getattr(trainer, name)


def timed_generate(*a, **k):
    start = time.perf_counter()
    out = generate(*a, **k)
    totals["generation_seconds"] += time.perf_counter() - start
    totals["calls"] += 1
    if args.trainer == "online_dpo":  # (prompt_ids, prompt_mask, completion_ids, completion_mask, vision inputs)
        completion_ids, completion_mask = out[2], out[3]
        totals["responses"] += completion_ids.shape[0]
        totals["generated_tokens"] += int(completion_mask.sum())  # up to and including EOS, as ours counts
        totals["eos"] += int((completion_ids == trainer._tokenizer.eos_token_id).any(-1).sum())
        totals["longest"] = max(totals["longest"], completion_ids.shape[1])  # generate's steps: the longest response
    else:  # the completions as lists of ids, cut after EOS (grpo: with their sampling log-probs, None here)
        completions = out[0] if args.trainer == "grpo" else out
        totals["responses"] += len(completions)
        totals["generated_tokens"] += sum(map(len, completions))
        totals["eos"] += sum(ids[-1:] == [trainer._tokenizer.eos_token_id] for ids in completions)
        totals["longest"] = max(totals["longest"], *map(len, completions))
    return out


setattr(trainer, name, timed_generate)
trainer.train()
with open(os.path.join(args.output_dir, "generation.json"), "w") as f:
    json.dump(totals, f)
