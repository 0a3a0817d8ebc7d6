"""The command line's one-line errors: `fail`, and the range checks run before any work, where a bad flag stops the
run in one line that names the flag, the value and what is accepted. Each script checks its own flags in its
`check_args`; the flags scripts share (DESIGN.md's command line, and the nested --eval.*, --judge.* and --generation.*
groups) are checked here. And `import_function`, for the flags that name a python function."""

import importlib
import os
import sys

from common import toy


def fail(message: str):
    """Stop with a one-line error and no traceback."""
    raise SystemExit(f"error: {message}")


def import_function(flag: str, module: str, function: str):
    """FUNCTION of MODULE, named on the command line (e.g. --annotator python:my_rewards:f finds ./my_rewards.py)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as e:
        fail(f"{flag}: cannot import module '{e.name}' (searched the current directory and sys.path)")
    found = getattr(imported, function, None)
    if not callable(found):
        fail(f"{flag}: module '{module}' has no function '{function}'")
    return found


def require(ok: bool, flag: str, value, accepted: str):
    """Stop with "--flag VALUE: accepted" unless ok."""
    if not ok:
        fail(f"--{flag} {value}: {accepted}")


def check_shared_args(args):
    """The flags every script has (tests/test_scripts_agree.py keeps them in each), read by name: a renamed one fails
    here, not silently."""
    for flag, value in (
        ("max_steps", args.max_steps),
        ("per_device_batch_size", args.per_device_batch_size),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps),
        ("log_every", args.log_every),
        ("eval_every", args.eval_every),
    ):
        require(value >= 1, flag, value, "must be at least 1")
    for flag, value in (
        ("save_every", args.save_every),
        ("warmup_steps", args.warmup_steps),
        ("weight_decay", args.weight_decay),
    ):
        require(value >= 0, flag, value, "must be 0 or more")
    if args.learning_rate is not None:
        require(args.learning_rate > 0, "learning_rate", args.learning_rate, "must be above 0")
    require(args.max_grad_norm > 0, "max_grad_norm", args.max_grad_norm, "must be above 0 (the clipping norm)")
    require(1 <= args.max_prompt_length, "max_prompt_length", args.max_prompt_length, "must be at least 1")
    lora = args.lora
    require(lora.r >= 0, "lora.r", lora.r, "must be 0 (no adapters: every weight trains) or more")
    require(lora.alpha > 0, "lora.alpha", lora.alpha, "must be above 0")
    require(0 <= lora.dropout < 1, "lora.dropout", lora.dropout, "must be in [0, 1)")
    require(lora.target_modules != "", "lora.target_modules", "''", "must name layers, or be all-linear")


def check_dataset_args(args):
    """The flags of the scripts that train on the dataset's examples (all but rl_ppo.py): --max_length,
    --num_eval_examples."""
    require(args.num_eval_examples >= 0, "num_eval_examples", args.num_eval_examples, "must be 0 or more")
    require(
        args.max_prompt_length < args.max_length,
        "max_prompt_length",
        args.max_prompt_length,
        f"must be below --max_length ({args.max_length}) to leave room for the response",
    )


def check_eval_args(eval_args, max_new_tokens: int, dataset: str):
    """--eval.* (common.evaluation.EvalArgs) and the response length of the held-out samples."""
    require(eval_args.num_prompts >= 0, "eval.num_prompts", eval_args.num_prompts, "must be 0 or more")
    require(eval_args.temperature >= 0, "eval.temperature", eval_args.temperature, "must be 0 (greedy) or more")
    require(eval_args.batch_size >= 1, "eval.batch_size", eval_args.batch_size, "must be at least 1")
    require(max_new_tokens >= 1, "generation.max_new_tokens", max_new_tokens, "must be at least 1")
    if eval_args.annotator == "toy" and not toy.is_toy(dataset):
        fail("--eval.annotator toy scores only the toy task; choose an annotator for this dataset (see --help)")


def check_online_args(args):
    """--annotator, --generation.* and --judge.* of the online scripts (and rl_ppo.py)."""
    generation, judge = args.generation, args.judge
    if args.reweighter.startswith("importance:"):
        fail(
            f"--reweighter {args.reweighter}: online samples come from the policy itself, so pi / rho is 1; "
            "importance weights are for offline data"
        )
    if args.annotator == "toy" and not toy.is_toy(args.dataset):
        fail("--annotator toy scores only the toy task; choose an annotator for this dataset (see --help)")
    require(
        generation.temperature > 0,
        "generation.temperature",
        generation.temperature,
        "must be above 0 online (at 0 every sample of a prompt is the same, so there is nothing to compare)",
    )
    require(0 < generation.top_p <= 1, "generation.top_p", generation.top_p, "must be in (0, 1]")
    require(judge.timeout > 0, "judge.timeout", judge.timeout, "must be above 0 seconds")
    require(judge.retries >= 0, "judge.retries", judge.retries, "must be 0 or more")
    require(judge.backoff >= 0, "judge.backoff", judge.backoff, "must be 0 or more seconds")
    require(judge.max_concurrency >= 1, "judge.max_concurrency", judge.max_concurrency, "must be at least 1")
    require(judge.batch_size >= 1, "judge.batch_size", judge.batch_size, "must be at least 1")
    require(judge.deadline > 0, "judge.deadline", judge.deadline, "must be above 0 seconds")
