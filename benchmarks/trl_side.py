"""The TRL side of the benchmark: one TRL trainer on the same files and settings as our script.

    python benchmarks/trl_side.py sft --model_name_or_path W --dataset W/sft.jsonl --max_steps 36 --output_dir D

The flags are our scripts' names for the same things. TRL gets its defaults except where they would make the
two sides do different work: fp32 (TRL defaults to bf16), no gradient checkpointing (TRL defaults to on, ours
to off), our seed and learning-rate schedule (20 warmup steps, then cosine), no checkpoints, no logging
until the end. The model is given as the folder, as in a normal TRL run, so TRL loads it: a causal LM for SFT
and DPO (DPO loads a second copy as the reference and runs it every step: precompute_ref_log_probs=False is
TRL's default), a sequence-classification head (num_labels=1, random init) on the same LM for the reward model.
"""

import argparse

from datasets import load_dataset
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

TRAINERS = {"sft": (SFTConfig, SFTTrainer), "reward_model": (RewardConfig, RewardTrainer), "dpo": (DPOConfig, DPOTrainer)}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("trainer", choices=TRAINERS)
parser.add_argument("--model_name_or_path", required=True, help="folder with the model and its tokenizer")
parser.add_argument("--dataset", required=True, help="local .jsonl: prompt/completion (sft) or prompt/chosen/rejected")
parser.add_argument("--output_dir", required=True, help="TRL's output folder (nothing is saved in it)")
parser.add_argument("--max_steps", type=int, required=True, help="optimizer steps")
parser.add_argument("--seed", type=int, default=1, help="seed (ours defaults to 1)")
parser.add_argument("--per_device_batch_size", type=int, default=8, help="examples (pairs) per step")
parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
parser.add_argument("--max_length", type=int, default=256, help="longest prompt + response in tokens")
parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
args = parser.parse_args()

config_class, trainer_class = TRAINERS[args.trainer]
method = {"sft": {"completion_only_loss": True}, "reward_model": {}, "dpo": {"beta": args.beta, "loss_type": ["sigmoid"]}}[args.trainer]
config = config_class(
    output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed, per_device_train_batch_size=args.per_device_batch_size,
    learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=20, max_length=args.max_length,
    bf16=False, activation_checkpointing=False, model_init_kwargs={"dtype": "float32"},
    eval_strategy="no", save_strategy="no", report_to="none", logging_steps=args.max_steps, **method,
)
train_dataset = load_dataset("json", data_files=args.dataset, split="train")
trainer_class(model=args.model_name_or_path, args=config, train_dataset=train_dataset).train()
