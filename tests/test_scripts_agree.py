"""The scripts copy their shared flags (CleanRL style: each script owns its Args). This keeps the copies honest: a flag
with the same name has the same type, default and help in every script, unless it is listed here with its reason."""

import ast
import dataclasses
import importlib

import pytest

from common.reweight import REWEIGHTERS
from conftest import REPO

SCRIPTS = ["sft.py", "reward_model.py", "dpo_pairwise.py", "kto_pointwise.py", "rl_ppo.py"]
PER_SCRIPT_DEFAULT = {  # flags whose default is the script's own; the help still agrees
    "exp_name": "names the run after the script",
    "output_dir": "runs/<script>",
    "max_steps": "tuned per method on the toy task",
    "per_device_batch_size": "tuned per method on the toy task",
    "warmup_steps": "tuned per method on the toy task",
    "eval_every": "a few evaluations per default run",
}
PER_SCRIPT = {
    "learning_rate": "the pointwise and pairwise scripts' defaults depend on --online, so the type and help differ",
    "beta": "each method's beta",
    "precompute_ref_logps": "what is precomputed differs (pairs; examples and their mismatched pairs)",
    "online": "pairs or single responses",
    "max_steps": "rl_ppo.py counts rollouts, each several optimizer steps",
    "reweighter": "each script's help lists the kinds it takes (common.reweight.check_reweighter refuses the others)",
}
WITHOUT = {  # shared flags a script does not have, with the reason
    "rl_ppo.py": {
        "num_eval_examples": "trains on prompts and has no held-out loss",
        "max_length": "trains on its samples, whose length is --generation.max_new_tokens",
    }
}


def args_fields(script: str) -> dict[str, tuple[str, str, str]]:
    """name -> (type, default, help) of the script's Args dataclass, read from its source."""
    tree = ast.parse((REPO / script).read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args").body
    fields = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            docstring = (
                after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            )
            fields[node.target.id] = (
                ast.unparse(node.annotation),
                ast.unparse(node.value),
                " ".join(docstring.split()),
            )
    return fields


def test_every_field_has_help():
    for script in SCRIPTS:
        for name, (kind, _, docstring) in args_fields(script).items():
            assert docstring or kind.endswith("Args"), f"{script}: --{name} has no help"


@pytest.mark.parametrize("other", SCRIPTS[1:])
def test_shared_flags_agree(other):
    first, second = args_fields(SCRIPTS[0]), args_fields(other)
    for name in sorted(set(first) & set(second) - set(PER_SCRIPT)):
        (type1, default1, help1), (type2, default2, help2) = first[name], second[name]
        assert type1 == type2, f"--{name}: type {type1} in {SCRIPTS[0]}, {type2} in {other}"
        assert help1 == help2, f"--{name}: help differs between {SCRIPTS[0]} and {other}:\n  {help1}\n  {help2}"
        if name not in PER_SCRIPT_DEFAULT:
            assert default1 == default2, f"--{name}: default {default1} in {SCRIPTS[0]}, {default2} in {other}"


def test_the_shared_groups_are_in_every_script():
    shared = {
        "exp_name",
        "seed",
        "output_dir",
        "track",
        "resume",
        "overwrite",
        "save_every",
        "log_every",
        "model_name_or_path",
        "dataset",
        "dataset_split",
        "eval_dataset",
        "eval_split",
        "max_length",
        "max_prompt_length",
        "group_by_length",
        "reweighter",
        "gradient_checkpointing",
        "dtype",
        "lora",
        "max_steps",
        "learning_rate",
        "per_device_batch_size",
        "gradient_accumulation_steps",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "eval_every",
        "num_eval_examples",
    }
    for script in SCRIPTS:
        missing = shared - set(args_fields(script)) - set(WITHOUT.get(script, {}))
        assert not missing, f"{script} lacks {sorted(missing)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_reweighter_help_lists_what_the_script_takes(script):
    """A kind is in a script's --reweighter help (as "FORM (") exactly when its check_args does not refuse it (online
    for confidence, which weighs online pairs)."""
    module = importlib.import_module(script.removesuffix(".py"))
    help_text = args_fields(script)["reweighter"][2]
    for kind, form in REWEIGHTERS.items():
        spec = form.replace("PATH", "runs/x").replace("MODULE:FUNCTION", "weights:f")
        args = dataclasses.replace(module.Args(), reweighter=spec)
        if hasattr(args, "online"):
            args.online = kind == "confidence"
        if script == "rl_ppo.py":
            args.num_samples = 1  # its main's default, resolved before check_args
        try:
            module.check_args(args)
            refused = False
        except SystemExit as e:
            refused = "--reweighter" in str(e)
        assert (f"{form} (" in help_text) != refused, f"{script} --reweighter {kind}: help and check_args disagree"
