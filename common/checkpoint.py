"""A run's output_dir: who owns it (run ids), checkpoints (save, resume, damaged ones, full disks) and the final
model. Checkpoints assume every rank sees the same --output_dir (one node, or a shared filesystem)."""

import errno
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from common.distributed import all_reduce, gather_objects, is_main, print0
from common.flags import fail

TRAINED = StateDictOptions(ignore_frozen_params=True)  # a checkpoint holds what trains (a LoRA model: its adapters)


def check_finite_weights(model: torch.nn.Module, what: str):
    """Stop with one line, on every process, rather than save non-finite weights."""
    bad = [
        name
        for name, p in model.named_parameters()
        if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
    ]
    if all_reduce(len(bad)).item():
        fail(f"not saving {what}: non-finite weights ({', '.join(bad[:3]) or 'on another process'})")


def save_pretrained(model, tokenizer, output_dir: str, merge: bool = True):
    """Gather the full state dict (a collective: every rank calls this) and save it on rank 0 as
    safetensors + config + tokenizer, loadable with `from_pretrained`. Never non-finite weights.
    A LoRA model: its adapters in peft's format to output_dir/adapter (with the tokenizer: common.model's loaders read
    the folder as its base with the adapters merged, PeftModel.from_pretrained attaches them to the base), and, with
    merge, the model with the adapters merged into its weights to output_dir."""
    check_finite_weights(model, f"the model to '{output_dir}'")
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main() and hasattr(model, "peft_config"):
        # the embeddings do not train with adapters (save_embedding_layers="auto" would look the base up on the hub)
        model.save_pretrained(os.path.join(output_dir, "adapter"), state_dict=state_dict, save_embedding_layers=False)
        tokenizer.save_pretrained(os.path.join(output_dir, "adapter"))
        if merge:
            merged_copy(model, state_dict).save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    elif is_main():
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    dist.barrier()


def merged_copy(model, state_dict: dict):
    """A copy on the CPU of a LoRA model (peft) whose weights are the full state dict's, with its adapters merged into
    them (peft's merge_and_unload): made on the meta device and given the state dict's tensors, so no third copy."""
    from common.model import add_lora_config

    base, config = model.get_base_model(), model.peft_config["default"]
    transformers_class = next(c for c in type(base).__mro__ if c.__module__.startswith("transformers."))  # not FSDP's
    with torch.device("meta"):
        copy = add_lora_config(transformers_class(base.config), config)
    copy.load_state_dict(state_dict, assign=True)
    copy.get_base_model().tie_weights()  # assigned one by one, tied weights (embeddings, LM head) come apart
    return copy.merge_and_unload()


def claim_output_dir(output_dir: str, resume: bool, overwrite: bool) -> str:
    """Check --output_dir before any model or data loading (every rank calls this right after init_distributed)
    and return the run id that this run's checkpoints carry. The folder must be a directory every rank can
    write (created if missing). A new run refuses a folder that holds checkpoints unless --overwrite, which
    deletes them and unfinished .tmp ones: two runs in one folder would prune each other's checkpoints and a
    later --resume would continue whichever is newest. A new run gets a fresh id; --resume the id recorded in
    the newest checkpoint (`unknown` for checkpoints saved before run ids existed)."""
    if resume and overwrite:
        fail("--resume continues the checkpoints in --output_dir and --overwrite deletes them: pass one of them")
    path = Path(output_dir)
    error = None
    if path.exists() and not path.is_dir():
        error = f"--output_dir '{output_dir}' exists and is not a directory"
    else:
        probe = path / f".write-probe-rank{dist.get_rank()}"  # every rank: they may be on different nodes
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text("probe")
            probe.unlink()
        except OSError as e:
            error = f"--output_dir '{output_dir}' cannot be written: {_os_reason(e)}"
    if error := _agree(error):
        fail(error)
    decision = [None, None]  # (run id, error), made on rank 0 and sent to all
    if is_main():
        decision = _claim(output_dir, resume, overwrite)
    dist.broadcast_object_list(decision, src=0)
    if decision[1]:
        fail(decision[1])
    return decision[0]


def _claim(output_dir: str, resume: bool, overwrite: bool) -> list:
    found = checkpoints(output_dir)
    if resume:
        return [_newest_run(found), None] if found else [None, f"--resume: no checkpoint in '{output_dir}'"]
    if found and not overwrite:
        newest = {}  # run id -> its newest step (found is oldest first)
        for p in found:
            newest[_run_of(p)] = p.name.split("-")[-1]
        runs = ", ".join(
            f"run {run} (newest step {step})" if run else f"a damaged checkpoint (step {step})"
            for run, step in newest.items()
        )
        return [
            None,
            f"--output_dir '{output_dir}' holds the checkpoints of {runs}; pass --resume to continue it, "
            "--overwrite to delete its checkpoints, or another --output_dir",
        ]
    stale = found + sorted(p for p in Path(output_dir).glob("checkpoint-*.tmp") if p.is_dir())
    for p in stale:
        try:
            shutil.rmtree(p)
        except OSError as e:
            return [None, f"--overwrite: cannot delete '{p}': {_os_reason(e)}"]
    if stale:
        print(f"--overwrite: deleted {', '.join(p.name for p in stale)} from '{output_dir}'", flush=True)
    return [uuid.uuid4().hex[:12], None]


def save_checkpoint(
    output_dir: str, step: int, model, optimizer, scheduler, data_state: dict, run_id: str, keep: int = 2
):
    """Sharded model + optimizer (torch.distributed.checkpoint), scheduler, data position, run id and each rank's
    RNG states, written to checkpoint-STEP.tmp and renamed when complete, so a process killed during a save
    leaves the last good checkpoint intact. The newest `keep` checkpoints of this run are kept; other runs' are
    never touched. A failed write (a full disk, a lost mount) removes the .tmp and stops every rank with the same
    one line: the ranks compare errors after each stage, and dcp.save raises on every rank when one rank's write
    fails. An exception that is no write failure (a bug) is raised where it happens; torchrun then stops the
    other ranks, as it does for any failed rank. Never non-finite weights."""
    check_finite_weights(model, f"checkpoint-{step}")
    final, tmp = Path(output_dir) / f"checkpoint-{step}", Path(output_dir) / f"checkpoint-{step}.tmp"
    where = f"{final.name} in '{output_dir}'"
    error = None
    if is_main():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _write_error(e, where, output_dir, run_id)
    error = _agree(error)  # also the barrier: tmp exists before any rank writes into it
    if error is None:
        try:
            model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            rng = {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            }
            torch.save(rng, tmp / f"rng_rank{dist.get_rank()}.pt")
            if is_main():
                trainer_state = {
                    "step": step,
                    "run_id": run_id,
                    "scheduler": scheduler.state_dict(),
                    "data": data_state,
                }
                torch.save(trainer_state, tmp / "trainer_state.pt")
        except (Exception, dcp.CheckpointException) as e:
            error = _write_error(e, where, output_dir, run_id)
            if error is None:
                raise
        error = _agree(error)
    if error is None:
        if is_main():
            try:
                error = _publish(final, tmp, where, run_id, keep)
            except OSError as e:
                error = _write_error(e, where, output_dir, run_id)
        error = _agree(error)
    if error is not None:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        fail(error)


def _publish(final: Path, tmp: Path, where: str, run_id: str, keep: int) -> str | None:
    """Rank 0: rename the finished tmp to final, then prune this run's older checkpoints. Returns an error or None."""
    if final.exists():
        owner = _run_of(final)
        if owner not in (None, run_id):
            return f"{where} belongs to run {owner}, not to this run ({run_id}): is another run saving there?"
        shutil.rmtree(final)  # this run's own (a --resume fell back past it) or a damaged one
    tmp.rename(final)
    # renamed before it is deleted, so a kill during the deletion leaves no half checkpoint that looks like one;
    # such leftovers (checkpoint-N.deleting) are removed at the next save
    try:
        for old in [p for p in checkpoints(final.parent) if _run_of(p) == run_id][: -max(keep, 1)]:
            old.rename(old.with_name(old.name + ".deleting"))
        for path in final.parent.glob("checkpoint-*.deleting"):
            shutil.rmtree(path)
    except OSError as e:
        print(f"warning: could not delete an old checkpoint in '{final.parent}': {_os_reason(e)}", flush=True)
    return None


def checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (of every run: see _run_of)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def load_checkpoint(output_dir: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the newest loadable checkpoint of the newest run (the run id claim_output_dir returned) into
    model/optimizer/scheduler and the RNGs; returns (step, data_state). A damaged checkpoint (a file missing or
    shorter than .metadata says, or one torch cannot read) is reported in one line and the one before it of the
    same run is tried. The ranks agree after every check and read, so none falls back alone, and each attempt
    reads the whole model and optimizer, so a checkpoint that failed half-way leaves nothing of itself behind."""
    plan = [None, None]  # (run id, its checkpoints newest first, with the unreadable ones that may be its)
    if is_main():
        found = checkpoints(output_dir)
        run_id = _newest_run(found)
        plan = [run_id, [p for p in reversed(found) if _run_of(p) in (run_id, None)]]
    dist.broadcast_object_list(plan, src=0)
    run_id, candidates = plan
    if not candidates:
        fail(f"--resume: no checkpoint in '{output_dir}'")
    for i, path in enumerate(candidates):
        error, small_files = None, None
        try:
            small_files = _read_small_files(path)
        except Exception as e:
            error = _one_line(e)
        if (error := _agree(error)) is None:
            try:
                model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
                state = {"model": model_state, "optimizer": optim_state}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optimizer"],
                    options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen are not saved
                )
            except (Exception, dcp.CheckpointException) as e:
                error = _one_line(e)
            error = _agree(error)
        if error is None:
            break
        print0(f"cannot resume from '{path}' ({error})" + ("; trying the one before it" if candidates[i + 1 :] else ""))
    else:
        tried = ", ".join(p.name for p in candidates)
        fail(
            f"--resume: no checkpoint in '{output_dir}' can be loaded (tried {tried}); "
            "delete them, or start afresh with --overwrite instead of --resume"
        )
    trainer_state, rng = small_files
    scheduler.load_state_dict(trainer_state["scheduler"])
    if rng is not None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print0(f"{path} has no RNG state for rank {dist.get_rank()} (different world size); continuing with fresh RNG")
    print0(f"resuming run {run_id} from {path} (step {trainer_state['step']})")
    return trainer_state["step"], trainer_state["data"]


def _read_small_files(path: Path) -> tuple[dict, dict | None]:
    """(trainer state, this rank's RNG states or None) of a checkpoint whose files are all there at full length:
    .metadata lists each shard file and the bytes read from it. Raises with the reason otherwise."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    extents = {}  # shard file -> the bytes .metadata expects in it
    for info in (metadata.storage_data or {}).values():
        extents[info.relative_path] = max(extents.get(info.relative_path, 0), info.offset + info.length)
    for name, extent in extents.items():
        size = (path / name).stat().st_size
        if size < extent:
            raise EOFError(f"{name} is truncated: {size} bytes of {extent}")
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    return trainer_state, torch.load(rng_file, weights_only=False) if rng_file.exists() else None


def _run_of(checkpoint: Path) -> str | None:
    """The run id a checkpoint was saved under (`unknown` if saved before run ids existed); None if unreadable."""
    try:
        return torch.load(checkpoint / "trainer_state.pt", weights_only=False).get("run_id", "unknown")
    except Exception:
        return None


def _newest_run(found: list[Path]) -> str:
    """The run of the newest checkpoint whose trainer state can be read: the run --resume continues."""
    return next((run for run in map(_run_of, reversed(found)) if run is not None), "unknown")


def _agree(error: str | None) -> str | None:
    """Every rank's error (None: none) gathered, so that all ranks go on or stop together: the first, or None."""
    gathered = gather_objects(error)
    rank = next((rank for rank, e in enumerate(gathered) if e is not None), None)
    return None if rank is None else gathered[rank] if len(gathered) == 1 else f"rank {rank}: {gathered[rank]}"


def _causes(e: BaseException) -> list[BaseException]:
    """e and what it wraps: dcp's CheckpointException carries each failed rank's exception."""
    inner = [exc for exc, _ in e.failures.values()] if isinstance(e, dcp.CheckpointException) else []
    return [e, *inner, *(c for c in (e.__cause__, e.__context__) if c is not None)]


def _write_error(e: BaseException, where: str, output_dir: str, run_id: str) -> str | None:
    """One line for a failed checkpoint write; None for an exception that is no write failure."""
    mine = [p for p in checkpoints(output_dir) if _run_of(p) == run_id]
    intact = f"{mine[-1].name} is intact" if mine else "no earlier checkpoint of this run"
    for cause in _causes(e):
        # torch's zip writer meets a full disk as a short write, and says only this:
        short_write = isinstance(cause, RuntimeError) and any(
            text in str(cause) for text in ("unexpected pos", "PytorchStreamWriter failed", "iostream error")
        )
        if short_write or isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on device while writing {where} ({intact}); free space or change --output_dir"
    for cause in _causes(e):
        if isinstance(cause, OSError):
            return f"cannot write {where}: {_os_reason(cause)} ({intact})"
    return None


def _os_reason(e: OSError) -> str:
    return f"{e.strerror}: '{e.filename}'" if e.strerror and e.filename else str(e)


def _one_line(e: BaseException) -> str:
    if isinstance(e, dcp.CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError):
        return _os_reason(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
