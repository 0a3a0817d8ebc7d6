"""Bad flags, models, annotators and output folders: each ends in a one-line error that names the problem (no
traceback), or in a documented skip that is counted and logged. Bad data files are in test_bad_data.py, damaged
checkpoints in test_checkpoints.py."""

import dataclasses

import pytest
import torch

import dpo_pairwise
import reward_model
import sft
from common.annotators import JudgeArgs
from common.evaluation import EvalArgs
from common.generation import GenerationArgs
from common.model import load_reward_model, load_tokenizer
from conftest import read_metrics, run_script

SCRIPTS = {"sft.py": sft, "reward_model.py": reward_model, "dpo_pairwise.py": dpo_pairwise}
BAD_FLAGS = [  # (script, flags, what the error line says)
    ("sft.py", {"max_steps": 0}, "--max_steps 0: must be at least 1"),
    ("sft.py", {"per_device_batch_size": 0}, "--per_device_batch_size 0: must be at least 1"),
    ("sft.py", {"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps 0: must be at least 1"),
    ("sft.py", {"eval_every": 0}, "--eval_every 0: must be at least 1"),
    ("sft.py", {"log_every": 0}, "--log_every 0: must be at least 1"),
    ("sft.py", {"save_every": -1}, "--save_every -1: must be 0 or more"),
    ("sft.py", {"learning_rate": -1e-4}, "--learning_rate -0.0001: must be above 0"),
    ("sft.py", {"warmup_steps": -1}, "--warmup_steps -1: must be 0 or more"),
    ("sft.py", {"max_grad_norm": 0.0}, "--max_grad_norm 0.0: must be above 0"),
    ("sft.py", {"max_prompt_length": 0}, "--max_prompt_length 0: must be at least 1"),
    ("sft.py", {"max_prompt_length": 512}, "--max_prompt_length 512: must be below --max_length (512)"),
    ("sft.py", {"eval": EvalArgs(temperature=-1.0)}, "--eval.temperature -1.0: must be 0 (greedy) or more"),
    ("sft.py", {"eval": EvalArgs(batch_size=0)}, "--eval.batch_size 0: must be at least 1"),
    ("sft.py", {"eval": EvalArgs(num_prompts=-1)}, "--eval.num_prompts -1: must be 0 or more"),
    ("sft.py", {"generation": GenerationArgs(max_new_tokens=0)}, "--generation.max_new_tokens 0: must be at least 1"),
    ("sft.py", {"dataset": "hh", "eval": EvalArgs(annotator="toy")}, "--eval.annotator toy scores only the toy task"),
    ("sft.py", {"reweighter": "confidence"}, "--reweighter confidence: sft.py takes none, policy, importance:PATH"),
    ("reward_model.py", {"reweighter": "policy"}, "--reweighter policy: reward_model.py takes none, python:"),
    ("reward_model.py", {"num_center_pairs": 0}, "--num_center_pairs 0: must be at least 1"),
    ("reward_model.py", {"weight_decay": -0.1}, "--weight_decay -0.1: must be 0 or more"),
    ("reward_model.py", {"num_eval_examples": -1}, "--num_eval_examples -1: must be 0 or more"),
    ("dpo_pairwise.py", {"beta": 0.0}, "--beta 0.0: must be above 0"),
    ("dpo_pairwise.py", {"loss_type": "ipo", "beta": -1.0}, "--beta -1.0: must be above 0"),
    ("dpo_pairwise.py", {"label_smoothing": 0.6}, "--label_smoothing 0.6: must be in [0, 0.5]"),
    ("dpo_pairwise.py", {"label_smoothing": -0.1}, "--label_smoothing -0.1: must be in [0, 0.5]"),
    ("dpo_pairwise.py", {"loss_type": "ipo", "label_smoothing": 0.1}, "applies to the sigmoid loss only"),
    ("dpo_pairwise.py", {"reweighter": "confidence"}, "only --online pairs have"),
    (
        "dpo_pairwise.py",
        {"online": True, "generation": GenerationArgs(temperature=0.0)},
        "--generation.temperature 0.0: must be above 0 online",
    ),
    (
        "dpo_pairwise.py",
        {"online": True, "generation": GenerationArgs(max_new_tokens=0)},
        "--generation.max_new_tokens 0: must be at least 1",
    ),
    (
        "dpo_pairwise.py",
        {"online": True, "generation": GenerationArgs(top_p=0.0)},
        "--generation.top_p 0.0: must be in (0, 1]",
    ),
    (
        "dpo_pairwise.py",
        {"online": True, "generation": GenerationArgs(top_p=1.5)},
        "--generation.top_p 1.5: must be in (0, 1]",
    ),
    ("dpo_pairwise.py", {"online": True, "judge": JudgeArgs(timeout=0.0)}, "--judge.timeout 0.0: must be above 0"),
    ("dpo_pairwise.py", {"online": True, "judge": JudgeArgs(retries=-1)}, "--judge.retries -1: must be 0 or more"),
    (
        "dpo_pairwise.py",
        {"online": True, "judge": JudgeArgs(max_concurrency=0)},
        "--judge.max_concurrency 0: must be at least 1",
    ),
    ("dpo_pairwise.py", {"online": True, "judge": JudgeArgs(deadline=0.0)}, "--judge.deadline 0.0: must be above 0"),
    ("dpo_pairwise.py", {"online": True, "judge": JudgeArgs(batch_size=0)}, "--judge.batch_size 0: must be at least 1"),
]


@pytest.mark.parametrize("script, flags, message", BAD_FLAGS, ids=[f"{s}:{','.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flags_fail_in_one_line(script, flags, message):
    """Each script's check_args, the first thing its main does."""
    module = SCRIPTS[script]
    args = dataclasses.replace(module.Args(), **flags)
    if args.learning_rate is None:  # dpo_pairwise.py resolves its mode-dependent default first
        args.learning_rate = 1e-5
    with pytest.raises(SystemExit) as e:
        module.check_args(args)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value) and message in str(e.value)


def last_line(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def test_bad_flag_from_the_command_line(tmp_path):
    """The same check end to end: the process exits non-zero, the error is the last line, nothing was written."""
    line = last_line(
        run_script("sft.py", "--gradient_accumulation_steps", "0", "--output_dir", str(tmp_path / "x"), check=False)
    )
    assert line == "error: --gradient_accumulation_steps 0: must be at least 1" and not (tmp_path / "x").exists()


def test_a_reward_model_is_not_a_policy_or_a_judge(tmp_path):
    """A sequence-classification folder (what reward_model.py saves) given as the policy or as judge:PATH."""
    rm, tokenizer = tmp_path / "rm", load_tokenizer("toy")
    load_reward_model("toy", tokenizer, torch.device("cpu")).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    line = last_line(
        run_script("sft.py", "--model_name_or_path", str(rm), "--output_dir", str(tmp_path / "a"), check=False)
    )
    assert "is a sequence-classification model (a reward model" in line and "--annotator reward_model:PATH" in line
    proc = run_script(
        "dpo_pairwise.py", "--online", "--annotator", f"judge:{rm}", "--output_dir", str(tmp_path / "b"), check=False
    )
    assert "is a sequence-classification model" in last_line(proc)


@pytest.mark.parametrize(  # end to end; the annotators' and reweighters' own checks are unit-tested in-process
    "flags, message",
    [
        (["--annotator", "gpt4"], "unknown --annotator 'gpt4'"),
        (["--dataset", "hh", "--annotator", "toy"], "--annotator toy scores only the toy task"),
        (["--annotator", "python:no_such_module:f"], "cannot import module 'no_such_module'"),
    ],
)
def test_bad_annotators_fail_in_one_line(tmp_path, flags, message):
    line = last_line(run_script("dpo_pairwise.py", "--online", *flags, "--output_dir", str(tmp_path), check=False))
    assert line.startswith("error: ") and message in line


@pytest.fixture
def annotators_module(tmp_path):
    (tmp_path / "bad_annotators.py").write_text(
        "import time\n"
        "def constant(prompts, responses):\n    return [0.5] * len(responses)\n"
        "def never_returns(prompts, responses):\n    time.sleep(3600)\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


def test_an_annotator_that_never_decides_stops_the_run(tmp_path, sft_model, annotators_module):
    """A constant score makes every pair a tie: each step is reported as having nothing to train on, and 10 in a
    row stop the run with a line naming the annotator and the counts (not 150 steps that train nothing)."""
    proc = run_script(
        "dpo_pairwise.py",
        "--online",
        "--model_name_or_path",
        str(sft_model),
        "--annotator",
        "python:bad_annotators:constant",
        "--per_device_batch_size",
        "4",
        "--eval.num_prompts",
        "16",
        "--output_dir",
        str(tmp_path),
        env=annotators_module,
        check=False,
    )
    line = last_line(proc)
    assert "10 steps in a row with nothing to train on" in line and "PythonAnnotator" in line and "ties" in line
    assert proc.stdout.count("nothing to train on in this step") == 10


def test_an_annotator_that_never_returns_stops_the_run(tmp_path, sft_model, annotators_module):
    """A python annotator that hangs costs one --judge.deadline per call; then its responses count as failed: in the
    step-0 evaluation (eval/failed 1, and the run goes on), and in the first step, where every annotation failed,
    which stops the run in one line."""
    proc = run_script(
        "dpo_pairwise.py",
        "--online",
        "--model_name_or_path",
        str(sft_model),
        "--annotator",
        "python:bad_annotators:never_returns",
        "--judge.deadline",
        "1",
        "--per_device_batch_size",
        "4",
        "--eval.num_prompts",
        "16",
        "--output_dir",
        str(tmp_path),
        env=annotators_module,
        check=False,
        timeout=120,
    )
    assert "the annotator failed on every example of a step" in last_line(proc) and "'deadline'" in last_line(proc)
    assert proc.stdout.count("did not return within --judge.deadline 1.0 s") == 2  # evaluation, step 1, stop
    assert read_metrics(tmp_path)[0]["eval/failed"] == 1.0
