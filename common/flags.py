"""Range checks of the command line, run before any work: a bad flag stops the run in one line that names the flag,
the value and what is accepted. Each script checks its own flags in its `check_args`; the flags every script shares
(DESIGN.md's command line, and the nested --judge.* and --generation.* groups) are checked here."""

from common import toy
from common.distributed import fail


def require(ok: bool, flag: str, value, accepted: str):
    """Stop with "--flag VALUE: accepted" unless ok."""
    if not ok:
        fail(f"--{flag} {value}: {accepted}")


def check_shared_args(args):
    """The flags of DESIGN.md's shared command line that a script has."""
    for flag in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "log_every", "eval_every"):
        if hasattr(args, flag):
            require(getattr(args, flag) >= 1, flag, getattr(args, flag), "must be at least 1")
    for flag in ("save_every", "warmup_steps", "weight_decay", "num_eval_examples", "num_eval_prompts"):
        if hasattr(args, flag):
            require(getattr(args, flag) >= 0, flag, getattr(args, flag), "must be 0 or more")
    if hasattr(args, "eval_annotator"):  # the held-out generation eval (common/evaluation.py)
        check_eval_args(args)
    if args.learning_rate is not None:
        require(args.learning_rate > 0, "learning_rate", args.learning_rate, "must be above 0")
    require(args.max_grad_norm > 0, "max_grad_norm", args.max_grad_norm, "must be above 0 (the clipping norm)")
    require(1 <= args.max_prompt_length, "max_prompt_length", args.max_prompt_length, "must be at least 1")
    require(
        args.max_prompt_length < args.max_length,
        "max_prompt_length",
        args.max_prompt_length,
        f"must be below --max_length ({args.max_length}) to leave room for the response",
    )
    if getattr(args, "online", False):
        check_online_args(args)


def check_eval_args(args):
    """--eval_annotator, --eval_temperature, --eval_batch_size and the response length of the held-out samples."""
    require(args.eval_temperature >= 0, "eval_temperature", args.eval_temperature, "must be 0 (greedy) or more")
    require(args.eval_batch_size >= 1, "eval_batch_size", args.eval_batch_size, "must be at least 1")
    max_new_tokens = args.generation.max_new_tokens
    require(max_new_tokens >= 1, "generation.max_new_tokens", max_new_tokens, "must be at least 1")
    if args.eval_annotator == "toy" and not toy.is_toy(args.dataset):
        fail("--eval_annotator toy scores only the toy task; choose an annotator for this dataset (see --help)")


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
