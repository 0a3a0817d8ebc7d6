"""A non-finite loss or gradient never reaches the weights (common.distributed.FiniteSteps): the step is skipped, its
weights and optimizer state stay as they were, it is printed and counted (train/nonfinite_steps), training goes on;
three in a row stop the run with one line and nothing saved. And --dtype: bf16 computes in bf16 over fp32 weights,
on both paths (a plain module with autocast for one process, FSDP2's mixed precision for several)."""

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from common.distributed import prepare_model
from common.model import load_causal_lm, load_tokenizer
from conftest import read_metrics, run_script

CPU = torch.device("cpu")
QUICK = ["--eval_every", "1000", "--log_every", "1", "--warmup_steps", "0"]  # and --eval.num_prompts 0 where it exists


def checkpoint_state(path, tmp_path) -> dict:
    """A checkpoint's model and optimizer state as one flat {name: tensor} dict."""
    dcp_to_torch_save(path, tmp_path / f"{path.name}.pt")
    state, flat = torch.load(tmp_path / f"{path.name}.pt", weights_only=False), {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", {"model": state["model"], "optimizer": state["optimizer"]["state"]})
    return flat


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path):
    """SFT with the gradients of step 3 NaN (tests/nonfinite.py): after step 3, the weights and AdamW's state (moments,
    step counts) are those after step 2 of the same run without NaN; step 4 trains on; the count is logged."""
    flags = [*QUICK, "--max_steps", "4", "--per_device_batch_size", "16", "--num_eval_examples", "0"]
    flags += ["--eval.num_prompts", "0"]
    run_script("sft.py", *flags, "--save_every", "2", "--output_dir", str(tmp_path / "clean"))
    broken = run_script(
        "tests/nonfinite.py", "3", "3", "sft.py", *flags, "--save_every", "1", "--output_dir", str(tmp_path / "nan")
    )
    assert "step 3: non-finite loss or gradient" in broken.stdout and "the step is skipped" in broken.stdout
    clean_2 = checkpoint_state(tmp_path / "clean" / "checkpoint-2", tmp_path)
    nan_3, nan_4 = (checkpoint_state(tmp_path / "nan" / f"checkpoint-{s}", tmp_path) for s in (3, 4))
    assert clean_2.keys() == nan_3.keys() and any(".step" in name for name in clean_2)
    for name, value in clean_2.items():
        assert torch.equal(value, nan_3[name]), name
    assert any(not torch.equal(value, nan_4[name]) for name, value in nan_3.items() if name.startswith(".model"))
    assert [m["train/nonfinite_steps"] for m in read_metrics(tmp_path / "nan")[1:]] == [0, 0, 1, 1]
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "nan" / "model.safetensors").values())


@pytest.mark.parametrize(
    "script, extra",
    [
        ("sft.py", []),
        ("reward_model.py", []),
        ("dpo_pairwise.py", []),
        ("kto_pointwise.py", []),
        ("rl_ppo.py", ["--num_ppo_epochs", "2", "--generation.max_new_tokens", "4"]),
    ],
)
def test_three_nonfinite_steps_in_a_row_stop_every_script(tmp_path, script, extra):
    """Every backward NaN from the first on: the third skipped step in a row stops the run with one error line, and
    no model is saved."""
    flags = [*QUICK, "--max_steps", "5", "--per_device_batch_size", "8", *extra, "--output_dir", str(tmp_path)]
    if script != "rl_ppo.py":
        flags += ["--num_eval_examples", "0"]
    if script != "reward_model.py":
        flags += ["--eval.num_prompts", "0"]
    proc = run_script("tests/nonfinite.py", "1", "1000", script, *flags, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 optimizer steps in a row, the last at step ") and "nothing is saved" in last
    assert not (tmp_path / "model.safetensors").exists()


def test_a_learning_rate_that_blows_up_stops_the_run(tmp_path):
    """bf16 SFT at a learning rate of 1e8: the first update makes every later gradient NaN; the run stops after three
    skipped steps instead of training on into NaN and saving it."""
    flags = [*QUICK, "--max_steps", "8", "--per_device_batch_size", "8", "--num_eval_examples", "0"]
    flags += ["--eval.num_prompts", "0"]
    proc = run_script(
        "sft.py", *flags, "--dtype", "bf16", "--learning_rate", "1e8", "--output_dir", str(tmp_path), check=False
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: 3 optimizer steps")
    assert "--dtype fp32" in proc.stderr and not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("shard", [False, True])
def test_bf16_computes_in_bf16_over_fp32_weights(world_of_one, shard):
    """--dtype bf16 on both paths: the forward's logits are bf16, the weights and their gradients fp32; the log-probs
    agree with fp32's to bf16's precision."""
    tokenizer = load_tokenizer("toy")
    ids = torch.tensor([tokenizer("dbca=abcd")["input_ids"]])
    fp32 = prepare_model(load_causal_lm("toy", tokenizer, CPU), CPU, torch.float32, shard=shard)
    bf16 = prepare_model(load_causal_lm("toy", tokenizer, CPU), CPU, torch.bfloat16, shard=shard)
    out = bf16(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.parameters())
    expected = fp32(input_ids=ids, labels=ids).loss
    assert abs(out.loss.item() - expected.item()) < 2e-2 and out.loss.item() != expected.item()


def test_bf16_one_process_and_two_agree(tmp_path):
    """sft.py --dtype bf16 on one process (autocast) and on two (FSDP2 mixed precision): the same losses to bf16's
    precision, both finite, and both below the first step's."""
    flags = [*QUICK, "--max_steps", "4", "--num_eval_examples", "0", "--eval.num_prompts", "0", "--dtype", "bf16"]
    run_script("sft.py", *flags, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "one"))
    run_script("sft.py", *flags, "--per_device_batch_size", "8", "--output_dir", str(tmp_path / "two"), nproc=2)
    one, two = ([m["train/loss"] for m in read_metrics(tmp_path / d)[1:]] for d in ("one", "two"))
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 2e-2
    assert one[-1] < one[0] and two[-1] < two[0]
