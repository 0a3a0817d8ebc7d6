"""sft.py: log-prob gathering by hand, save/load, 1 vs 2 processes, accumulation, kill + resume, learning, errors."""

import math
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.logps import response_logps
from common.model import load_causal_lm, load_tokenizer
from conftest import REPO, read_metrics, run_script, script_env

FAST = [
    "--max_steps",
    "12",
    "--log_every",
    "1",
    "--warmup_steps",
    "2",
    "--eval_every",
    "1000",
    "--eval.num_prompts",
    "32",
]


class FixedLogits(torch.nn.Module):
    """Every position predicts p = [1/2, 1/4, 1/4] over a 3-token vocabulary."""

    def forward(self, input_ids, attention_mask, logits_to_keep):
        logits = torch.zeros(*input_ids.shape, 3)
        logits[..., 0] = math.log(2)
        return SimpleNamespace(logits=logits[:, logits_to_keep])  # logits_to_keep: the positions to keep


def test_response_logps_by_hand():
    """Row 0: response tokens 2, 0 -> log(1/4), log(1/2). Row 1: response token 1 -> log(1/4); its
    position-3 token is padding, outside the response, so it contributes 0."""
    ids = torch.tensor([[1, 0, 2, 0], [1, 1, 1, 0]])
    response_mask = torch.tensor([[False, False, True, True], [False, False, True, False]])
    logps, mask = response_logps(FixedLogits(), ids, torch.ones_like(ids), response_mask)
    assert mask.tolist() == [[True, True], [True, False]]  # K = positions 2..3, the batch's first response token on
    assert torch.allclose(logps, torch.tensor([[math.log(1 / 4), math.log(1 / 2)], [math.log(1 / 4), 0.0]]))


def test_response_logps_match_full_log_softmax():
    tok = load_tokenizer("toy")
    model = load_causal_lm("toy", tok, torch.device("cpu"))
    ids = torch.randint(4, len(tok), (3, 12))
    response_mask = torch.zeros(3, 12, dtype=torch.bool)
    response_mask[0, 5:12], response_mask[1, 3:9], response_mask[2, 8:10] = True, True, True
    logps, mask = response_logps(model, ids, torch.ones_like(ids), response_mask)
    full = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (full * response_mask[:, 1:]).sum(-1)
    assert torch.allclose(logps.sum(-1), expected, atol=1e-5) and int(mask.sum()) == 15


def test_smoke_saves_a_loadable_model(tmp_path):
    run_script("sft.py", *FAST, "--max_steps", "3", "--output_dir", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # safetensors + config
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert model.config.architectures == ["LlamaForCausalLM"]
    metrics = read_metrics(tmp_path)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm"} <= set(metrics[-2]) | set(metrics[-1])
    assert [m["step"] for m in metrics if "eval/reward" in m] == [0, 3]  # start and end
    assert [m["step"] for m in metrics if "eval/loss" in m] == [0, 3]  # held-out NLL of the toy test split
    assert len({m["step"] for m in metrics}) == len(metrics)  # one object per logged step
    assert (tmp_path / "args.json").exists()


def losses(output_dir):
    return [m["train/loss"] for m in read_metrics(output_dir) if "train/loss" in m]


def test_accumulation_and_two_processes_match_one_full_batch(tmp_path):
    """Same global batch of 32, split three ways: (32 x 1 accumulation), (16 x 2), and 2 processes x 16.
    The loss is normalised by the global response-token count, so all three follow the same trajectory."""
    run_script("sft.py", *FAST, "--per_device_batch_size", "32", "--output_dir", str(tmp_path / "full"))
    run_script(
        "sft.py",
        *FAST,
        "--per_device_batch_size",
        "16",
        "--gradient_accumulation_steps",
        "2",
        "--output_dir",
        str(tmp_path / "accum"),
    )
    run_script("sft.py", *FAST, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "ddp"), nproc=2)
    full, accum, two = losses(tmp_path / "full"), losses(tmp_path / "accum"), losses(tmp_path / "ddp")
    assert len(full) == 12 and full[-1] < full[0] - 0.5  # it trains
    assert max(abs(a - b) for a, b in zip(full, accum)) < 1e-5
    assert max(abs(a - b) for a, b in zip(full, two)) < 1e-5
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("full", "accum", "ddp")]
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-5) and torch.allclose(w, weights[2][name], atol=1e-5)


def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    args = [
        "sft.py",
        "--max_steps",
        "60",
        "--save_every",
        "10",
        "--log_every",
        "5",
        "--eval_every",
        "40",
        "--eval.num_prompts",
        "32",
        "--per_device_batch_size",
        "32",
    ]
    run_script(*args, "--output_dir", str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *args, "--output_dir", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=script_env(),
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint-30").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    (killed / "checkpoint-999.tmp").mkdir()  # a save cut short by a kill: never complete, never resumed from
    run_script(*args, "--output_dir", str(killed), "--resume")
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name, w in straight.items():
        assert torch.equal(w, resumed[name]), name
    assert [m["step"] for m in read_metrics(killed)] == [m["step"] for m in read_metrics(tmp_path / "straight")]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == [
        "checkpoint-50",
        "checkpoint-60",
        "checkpoint-999.tmp",
    ]


def test_default_run_learns_to_rho_level(sft_model):
    """`python sft.py` (toy defaults): from random init (~0) to rho's level, 1 - E[1/L] = 0.7625."""
    rewards = [m["eval/reward"] for m in read_metrics(sft_model) if "eval/reward" in m]
    print(f"eval/reward {rewards}")
    assert rewards[0] < 0.1 and rewards[-1] > 0.72


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "no/such/file.jsonl"], "error: dataset file 'no/such/file.jsonl' does not exist"),
        (["--model_name_or_path", "./no-such-model"], "error: model './no-such-model' not found"),
    ],
)
def test_bad_paths_fail_in_one_line(flags, message):
    proc = run_script("sft.py", *flags, "--output_dir", "/tmp/unused", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


def test_columns_matching_no_layout_fail_in_one_line(tmp_path):
    (tmp_path / "odd.csv").write_text("question,answer\nq,a\n")
    proc = run_script("sft.py", "--dataset", str(tmp_path / "odd.csv"), "--output_dir", str(tmp_path), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "columns ['answer', 'question']" in last and "pairwise: chosen, prompt, rejected" in last


def test_track_with_wandb_offline(tmp_path):
    run_script(
        "sft.py",
        *FAST,
        "--max_steps",
        "2",
        "--track",
        "--output_dir",
        str(tmp_path),
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_held_out_loss_on_a_local_file(tmp_path, hh_path):
    """Any dataset with held-out data gets eval/loss, the held-out NLL per response token: here HH rows from a local
    file (the toy character tokenizer reads them), with --eval_dataset; a local file alone has no held-out split."""
    args = [
        "sft.py",
        *FAST,
        "--max_steps",
        "2",
        "--dataset",
        str(hh_path),
        "--max_length",
        "256",
        "--max_prompt_length",
        "128",
        "--per_device_batch_size",
        "4",
        "--num_eval_examples",
        "8",
    ]
    run_script(*args, "--eval_dataset", str(hh_path), "--output_dir", str(tmp_path / "with"))
    losses = [m["eval/loss"] for m in read_metrics(tmp_path / "with") if "eval/loss" in m]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    proc = run_script(*args, "--output_dir", str(tmp_path / "without"))
    assert not any("eval/loss" in m for m in read_metrics(tmp_path / "without")) and "no evaluation" in proc.stdout


def test_the_progress_bar_shows_the_latest_metrics(tmp_path, world_of_one):
    """The bar over the steps shows the last logged loss and tokens/s, and eval/reward once an evaluation logged it."""
    sys.path.insert(0, str(REPO))
    import sft
    from common.tracking import Tracker

    tracker = Tracker(sft.Args(output_dir=str(tmp_path)), run_id="test", derived={})
    bar = tracker.progress(range(2, 5), 5)
    assert list(bar) == [2, 3, 4] and bar.total == 5
    tracker.log(3, {"train/loss": 0.51234, "train/tokens_per_s": 12345.6, "train/lr": 1e-4})
    tracker.log(4, {"eval/reward": 0.75})
    assert bar.postfix == "loss=0.5123, tokens/s=12346, eval/reward=0.750"
