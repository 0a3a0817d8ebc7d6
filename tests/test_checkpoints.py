"""common/distributed.py checkpoints: claiming --output_dir, run ids, pruning, damaged checkpoints, a full disk.

In this process, on a world of one (conftest's world_of_one), with the toy model sharded by FSDP2."""

import errno
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import get_cosine_schedule_with_warmup

from common.checkpoint import checkpoints, claim_output_dir, load_checkpoint, save_checkpoint
from common.distributed import prepare_model
from common.model import load_causal_lm, load_tokenizer
from conftest import REPO, run_script

CPU = torch.device("cpu")


class Run:
    """The toy model, AdamW and a cosine schedule, trained a step at a time on random tokens."""

    def __init__(self):
        tokenizer = load_tokenizer("toy")
        self.model = prepare_model(load_causal_lm("toy", tokenizer, CPU), CPU, torch.float32, shard=True)  # FSDP2
        self.vocab_size = self.model.config.vocab_size
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, 0, 20)

    def train_step(self):
        ids = torch.randint(0, self.vocab_size, (2, 8))
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, output_dir, step, run_id, keep=2):
        save_checkpoint(str(output_dir), step, self.model, self.optimizer, self.scheduler, {"step": step}, run_id, keep)

    def load(self, output_dir):
        return load_checkpoint(str(output_dir), self.model, self.optimizer, self.scheduler)

    def weights(self) -> dict:
        return {name: p.full_tensor().detach().clone() for name, p in self.model.named_parameters()}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def names(output_dir) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


def two_checkpoints(output_dir) -> dict:
    """Run "a" saves checkpoint-1 and checkpoint-2 with different weights; returns checkpoint-1's weights."""
    run = Run()
    run.train_step()
    run.save(output_dir, 1, "a")
    first = run.weights()
    run.train_step()
    run.save(output_dir, 2, "a")
    assert any(not torch.equal(w, first[n]) for n, w in run.weights().items())
    return first


def assert_resumed_from_first(output_dir, first, capsys, reason):
    """A fresh run resumes from checkpoint-1 after saying why checkpoint-2 cannot be used, with its weights exactly."""
    run = Run()
    assert any(not torch.equal(w, first[n]) for n, w in run.weights().items())
    step, data = run.load(output_dir)
    assert (step, data) == (1, {"step": 1})
    out = capsys.readouterr().out
    assert f"cannot resume from '{output_dir / 'checkpoint-2'}' (" in out and reason in out, out
    assert f"resuming run a from {output_dir / 'checkpoint-1'} (step 1)" in out
    for name, w in run.weights().items():
        assert torch.equal(w, first[name]), name
    assert run.scheduler.last_epoch == 1


def test_output_dir_that_is_a_file(world_of_one, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as excinfo:
        claim_output_dir(str(tmp_path / "file"), resume=False, overwrite=False)
    assert "exists and is not a directory" in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:  # a file where a parent folder should be
        claim_output_dir(str(tmp_path / "file" / "run"), resume=False, overwrite=False)
    assert "cannot be written: Not a directory" in one_line_error(excinfo)


@pytest.mark.parametrize("path, reason", [("/proc", "No such file or directory"), ("/proc/no-run/x", "")])
def test_output_dir_that_cannot_be_written(world_of_one, path, reason):
    """/proc is a folder in which no file can be made, not even by root; nor can folders be made under it."""
    with pytest.raises(SystemExit) as excinfo:
        claim_output_dir(path, resume=False, overwrite=False)
    message = one_line_error(excinfo)
    assert message.startswith(f"error: --output_dir '{path}' cannot be written: {reason}"), message


def test_read_only_output_dir(world_of_one, tmp_path):
    tmp_path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (the /proc test covers this case)")
        with pytest.raises(SystemExit) as excinfo:
            claim_output_dir(str(tmp_path), resume=False, overwrite=False)
        assert "cannot be written: Permission denied" in one_line_error(excinfo)
    finally:
        tmp_path.chmod(0o755)


def test_new_run_gets_a_fresh_id_and_creates_the_folder(world_of_one, tmp_path):
    first = claim_output_dir(str(tmp_path / "new" / "run"), resume=False, overwrite=False)
    second = claim_output_dir(str(tmp_path / "new" / "run"), resume=False, overwrite=False)  # no checkpoints yet
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    assert len(first) == 12 and first != second


def test_reused_output_dir_names_the_other_run(world_of_one, tmp_path):
    two_checkpoints(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        claim_output_dir(str(tmp_path), resume=False, overwrite=False)
    message = one_line_error(excinfo)
    assert "holds the checkpoints of run a (newest step 2)" in message
    assert "--resume to continue it, --overwrite to delete its checkpoints, or another --output_dir" in message
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]


def test_resume_without_checkpoints_and_resume_with_overwrite(world_of_one, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        claim_output_dir(str(tmp_path), resume=True, overwrite=False)
    assert one_line_error(excinfo) == f"error: --resume: no checkpoint in '{tmp_path}'"
    with pytest.raises(SystemExit) as excinfo:
        claim_output_dir(str(tmp_path), resume=True, overwrite=True)
    assert "pass one of them" in one_line_error(excinfo)


def test_overwrite_deletes_the_checkpoints_and_unfinished_ones(world_of_one, tmp_path, capsys):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-3.tmp").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    run_id = claim_output_dir(str(tmp_path), resume=False, overwrite=True)
    assert run_id != "a" and names(tmp_path) == []
    assert (tmp_path / "metrics.jsonl").exists()
    out = capsys.readouterr().out
    assert f"--overwrite: deleted checkpoint-1, checkpoint-2, checkpoint-3.tmp from '{tmp_path}'" in out


def test_pruning_keeps_other_runs_and_resume_takes_the_newest_run(world_of_one, tmp_path, capsys):
    run = Run()
    for step in (1, 2, 3):
        run.save(tmp_path, step, "a")
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    assert claim_output_dir(str(tmp_path), resume=True, overwrite=False) == "a"
    for step in (4, 5, 6):
        run.train_step()
        run.save(tmp_path, step, "b")
        weights = run.weights()
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-5", "checkpoint-6"]
    assert claim_output_dir(str(tmp_path), resume=True, overwrite=False) == "b"
    resumed = Run()
    assert resumed.load(tmp_path)[0] == 6
    assert f"resuming run b from {tmp_path / 'checkpoint-6'} (step 6)" in capsys.readouterr().out
    assert all(torch.equal(w, weights[n]) for n, w in resumed.weights().items())


def test_a_step_another_run_holds_is_not_replaced(world_of_one, tmp_path):
    run = Run()
    run.save(tmp_path, 1, "a")
    with pytest.raises(SystemExit) as excinfo:
        run.save(tmp_path, 1, "b")
    assert "checkpoint-1 in" in one_line_error(excinfo) and "belongs to run a" in str(excinfo.value)
    assert (
        names(tmp_path) == ["checkpoint-1"]
        and torch.load(tmp_path / "checkpoint-1" / "trainer_state.pt", weights_only=False)["run_id"] == "a"
    )


def test_own_step_is_replaced_after_a_fallback(world_of_one, tmp_path):
    """A --resume that fell back past checkpoint-2 saves checkpoint-2 again: the damaged one is replaced."""
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / "trainer_state.pt").unlink()
    run = Run()
    run.load(tmp_path)
    run.train_step()
    run.save(tmp_path, 2, "a")
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "trainer_state.pt").exists()


def test_checkpoints_without_a_run_id_resume_as_run_unknown(world_of_one, tmp_path, capsys):
    """Checkpoints saved before run ids existed: their run is `unknown`; resuming and pruning still work."""
    first = two_checkpoints(tmp_path)
    for path in checkpoints(str(tmp_path)):
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        del state["run_id"]
        torch.save(state, path / "trainer_state.pt")
    assert claim_output_dir(str(tmp_path), resume=True, overwrite=False) == "unknown"
    (tmp_path / "checkpoint-2" / "trainer_state.pt").unlink()
    run = Run()
    assert run.load(tmp_path)[0] == 1
    assert f"resuming run unknown from {tmp_path / 'checkpoint-1'}" in capsys.readouterr().out
    assert all(torch.equal(w, first[n]) for n, w in run.weights().items())
    run.save(tmp_path, 3, "unknown", keep=1)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]  # the damaged checkpoint-2 is nobody's to prune


def test_missing_trainer_state_falls_back(world_of_one, tmp_path, capsys):
    first = two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / "trainer_state.pt").unlink()
    assert_resumed_from_first(tmp_path, first, capsys, "No such file or directory")


def test_missing_metadata_falls_back(world_of_one, tmp_path, capsys):
    first = two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / ".metadata").unlink()
    assert_resumed_from_first(tmp_path, first, capsys, ".metadata")


def test_missing_or_truncated_shard_falls_back(world_of_one, tmp_path, capsys):
    first = two_checkpoints(tmp_path)
    [shard] = (tmp_path / "checkpoint-2").glob("*.distcp")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert_resumed_from_first(tmp_path, first, capsys, f"{shard.name} is truncated: {size // 2} bytes of {size}")
    shard.unlink()
    assert_resumed_from_first(tmp_path, first, capsys, f"No such file or directory: '{shard}'")


def test_a_read_failing_half_way_leaves_nothing_behind(world_of_one, tmp_path, capsys, monkeypatch):
    """dcp.load fills the model from checkpoint-2 and then raises: the fallback overwrites all of it."""
    first = two_checkpoints(tmp_path)
    real_load = dcp.load

    def load_then_fail(state, checkpoint_id):
        real_load(state, checkpoint_id=checkpoint_id)
        if checkpoint_id.endswith("checkpoint-2"):
            raise RuntimeError("PytorchStreamReader failed reading file data/0: invalid header\nsecond line")

    monkeypatch.setattr(dcp, "load", load_then_fail)
    assert_resumed_from_first(tmp_path, first, capsys, "(RuntimeError: PytorchStreamReader failed reading file")


def test_all_checkpoints_damaged(world_of_one, tmp_path, capsys):
    two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / "trainer_state.pt").unlink()
    (tmp_path / "checkpoint-1" / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as excinfo:
        Run().load(tmp_path)
    message = one_line_error(excinfo)
    assert f"--resume: no checkpoint in '{tmp_path}' can be loaded (tried checkpoint-2, checkpoint-1)" in message
    assert "--overwrite instead of --resume" in message
    out = capsys.readouterr().out
    assert out.count("cannot resume from") == 2 and out.count("trying the one before it") == 1


FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    RuntimeError("basic_ios::clear: iostream error"),  # torch.save closing its zip on a full disk
]


@pytest.mark.parametrize("patched", ["dcp.save", "torch.save"])
@pytest.mark.parametrize("exception", FULL_DISK, ids=["ENOSPC", "stream-writer", "unexpected-pos", "iostream"])
def test_full_disk_stops_in_one_line_and_keeps_the_previous_checkpoint(
    world_of_one, tmp_path, monkeypatch, capsys, patched, exception
):
    first = two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-2.old")  # leave checkpoint-1, re-save step 2

    def full(*args, **kwargs):
        raise exception

    monkeypatch.setattr(dcp if patched == "dcp.save" else torch, "save", full)
    with pytest.raises(SystemExit) as excinfo:
        Run().save(tmp_path, 2, "a")
    monkeypatch.undo()
    assert one_line_error(excinfo) == (
        f"error: no space left on device while writing checkpoint-2 in '{tmp_path}' "
        "(checkpoint-1 is intact); free space or change --output_dir"
    )
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2.old"]  # the .tmp is gone
    run = Run()
    assert run.load(tmp_path)[0] == 1 and all(torch.equal(w, first[n]) for n, w in run.weights().items())


def test_other_write_errors_name_the_cause(world_of_one, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "checkpoint-1.tmp" / "trainer_state.pt"))

    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(SystemExit) as excinfo:
        Run().save(tmp_path, 1, "a")
    assert one_line_error(excinfo) == (
        f"error: cannot write checkpoint-1 in '{tmp_path}': Read-only file system: "
        f"'{tmp_path / 'checkpoint-1.tmp' / 'trainer_state.pt'}' "
        "(no earlier checkpoint of this run)"
    )
    assert names(tmp_path) == []


def test_a_bug_while_saving_keeps_its_traceback(world_of_one, tmp_path):
    run = Run()
    with pytest.raises(Exception, match="pickle"):  # no write failure: raised as it is, not as a one-line SystemExit
        save_checkpoint(str(tmp_path), 1, run.model, run.optimizer, run.scheduler, {"f": lambda: 0}, "a")


TWO_RANKS = """
import errno, sys, torch, torch.distributed as dist
from common.checkpoint import claim_output_dir
from common.distributed import init_distributed
from test_checkpoints import Run
init_distributed(0)
output_dir, rank = sys.argv[1], dist.get_rank()
run_id = claim_output_dir(output_dir, resume=False, overwrite=False)
run = Run()
for step in (1, 2):
    run.train_step()
    run.save(output_dir, step, run_id)
if rank == 1:  # damaged for rank 1 only
    open(f"{output_dir}/checkpoint-2/rng_rank1.pt", "wb").write(b"not a zip")
dist.barrier()
step = Run().load(output_dir)[0]
print(f"rank {rank} resumed at step {step}", flush=True)  # one string: the two ranks' lines cannot interleave
real_save = torch.save
def rank1_full(obj, f, *args, **kwargs):
    if rank == 1 and "rng_rank1" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = rank1_full
run.save(output_dir, 3, run_id)
"""


def test_two_ranks_fall_back_and_stop_together(tmp_path):
    """Under torchrun, rank 1 alone meets a damaged file, then a full disk: both ranks fall back to checkpoint-1
    together, then both stop with rank 1's one-line error (no rank waits forever in a collective)."""
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    proc = run_script(
        str(tmp_path / "two_ranks.py"),
        str(tmp_path / "out"),
        nproc=2,
        check=False,
        timeout=180,
        env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
    )
    resumed = "rank 0 resumed at step 1" in proc.stdout and "rank 1 resumed at step 1" in proc.stdout
    assert resumed, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "cannot resume from" in proc.stdout and "(rank 1: UnpicklingError" in proc.stdout
    message = (
        f"error: rank 1: no space left on device while writing checkpoint-3 in '{tmp_path / 'out'}' "
        "(checkpoint-2 is intact); free space or change --output_dir"
    )
    assert proc.returncode != 0 and proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert names(tmp_path / "out") == ["checkpoint-1", "checkpoint-2"]
