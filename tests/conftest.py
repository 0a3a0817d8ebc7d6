import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (pytest -n 2): one thread each
    torch.set_num_threads(1)
HH_PATH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def hh_path():
    if not HH_PATH.exists():
        pytest.skip(f"real HH-RLHF rows not found at {HH_PATH} (shared/data beside the checkout)")
    return HH_PATH


@pytest.fixture(scope="session")
def hh_rows(hh_path):
    with gzip.open(hh_path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, hh_rows):
    """A real byte-level BPE (2k vocab) trained on the HH text, with a ChatML template whose
    end-of-turn token <|im_end|> is EOS (as in Qwen's instruct models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = (r[k] for r in hh_rows[:1000] for k in ("chosen", "rejected"))
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    ).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def world_of_one():
    """A process group of one in this process (BatchFactory and reductions need one)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield


def run_script(
    script: str, *args: str, nproc: int = 1, check: bool = True, env: dict | None = None, timeout: int = 300
):
    """Run a top-level script (under torchrun when nproc > 1) in the repo; returns the CompletedProcess."""
    launcher = (  # --standalone: a free port, so torchrun runs of parallel test workers do not collide
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    full_env = {**script_env(), **({"OMP_NUM_THREADS": "1"} if nproc > 1 else {}), **(env or {})}
    proc = subprocess.run(
        [*launcher, script, *args], cwd=REPO, capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def script_env() -> dict:
    """The environment of a script the tests start: one torch thread per process when pytest-xdist runs tests in
    parallel (one worker per core), else the machine's default."""
    threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("OMP_NUM_THREADS", "2")
    return {**os.environ, "OMP_NUM_THREADS": threads}


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """`python sft.py` with its toy defaults, run once: the starting point of the alignment tests. Under pytest-xdist
    the workers share one run (the first to need it trains it, under a lock, in the session's common folder). If the
    run fails, every test that needs it fails with one line naming this fixture, the run's time and why, and the run
    is not tried again."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return shared_sft_run(tmp_path_factory.getbasetemp(), tmp_path_factory.getbasetemp() / "sft", {})
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, above each worker's own
    with FileLock(str(shared / "sft.lock")):  # two threads: the other worker is likely waiting for it
        return shared_sft_run(shared, shared / "sft", {"OMP_NUM_THREADS": "2"})


def shared_sft_run(shared: Path, output_dir: Path, env: dict) -> Path:
    failed = shared / "sft.failed"
    if not (output_dir / "model.safetensors").exists() and not failed.exists():
        start = time.time()
        try:
            run_script("sft.py", "--output_dir", str(output_dir), env=env)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            why = str(e).strip().splitlines()[-1][:300]
            failed.write_text(f"fixture sft_model: `python sft.py` failed after {time.time() - start:.0f} s: {why}")
    if failed.exists():
        pytest.fail(failed.read_text(), pytrace=False)
    return output_dir


def assert_resume_is_exact(tmp_path, script: str, *args: str, checkpoint: int, env: dict | None = None):
    """Run `script args` straight through; run it again, SIGKILL it once checkpoint-<checkpoint> exists, resume it;
    the final weights must be bit-identical and the logged steps the same."""
    from safetensors.torch import load_file

    run_script(script, *args, "--output_dir", str(tmp_path / "straight"), env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, script, *args, "--output_dir", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**script_env(), **(env or {})},
    )
    deadline = time.time() + 240
    while not (killed / f"checkpoint-{checkpoint}").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    resumed = run_script(script, *args, "--output_dir", str(killed), "--resume", env=env)
    assert "resuming run" in resumed.stdout
    straight, final = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name, w in straight.items():
        assert torch.equal(w, final[name]), name
    assert [m["step"] for m in read_metrics(killed)] == [m["step"] for m in read_metrics(tmp_path / "straight")]
    # the held-out evaluation's numbers too: its samples are seeded, and its initial responses were kept
    evals = [{k: v for k, v in m.items() if k.startswith("eval/") and "per_s" not in k} for m in read_metrics(killed)]
    assert evals == [
        {k: v for k, v in m.items() if k.startswith("eval/") and "per_s" not in k}
        for m in read_metrics(tmp_path / "straight")
    ]
    if (killed / "eval_samples.jsonl").exists():  # the table: no line twice, none lost
        tables = [(path / "eval_samples.jsonl").read_text() for path in (killed, tmp_path / "straight")]
        assert tables[0] == tables[1]
