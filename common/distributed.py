"""One code path for 1 and N processes: torchrun init, FSDP2, reductions, saving, checkpoints, metrics.

A single process runs as a world of size 1 (an in-memory store, no port), so every script shards with
FSDP2 and reduces with collectives whether it runs alone on a laptop or under torchrun.
Checkpoints assume every rank sees the same --output_dir (one node, or a shared filesystem).
"""

import errno
import importlib
import json
import os
import random
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm


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


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args):
    if is_main():
        print(*args, flush=True)


def init_distributed(seed: int) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). gloo on CPU, nccl on CUDA; torchrun's variables or a world of one."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # masked attention goes to the memory-efficient kernel, not cuDNN's, whose backward returns NaN gradients at
        # key lengths of 64 (mod 128) for rows with a very negative log-sum-exp (pytorch/pytorch#196678,
        # NVIDIA/cudnn-frontend#628): always for fully masked rows (common.logps.attention_mask leaves none), and
        # in some models for real ones (huggingface/trl#7181)
        torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device if device.type == "cuda" else None
        )
    else:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the same on every rank: identical initial weights before sharding. Sampling from
    # the policy draws from a generator of its own per process (common.batch.OnlineBatchFactory)
    return rank, world_size, device


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: the dtype forwards compute in. auto: bf16 on CUDA, fp32 on CPU. Weights stay fp32 (the master copy
    the optimizer updates) whatever it is."""
    return DTYPES[name] if name != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32


def prepare_model(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, trainable: bool = True, shard: bool | None = None
) -> torch.nn.Module:
    """The model on `device`, its fp32 weights the master copy, its forwards computing in `dtype`; frozen unless
    trainable. Several processes (or shard=True): FSDP2, `fully_shard` each decoder layer and then the root, the
    gathered parameters cast to dtype, gradients reduced in fp32. One process: a plain module whose forward runs
    under torch.autocast(dtype), as FSDP2 at world size 1 would still copy and cast every parameter at each forward
    and backward and make the optimizer step over DTensors (pytorch/pytorch#134191). Both paths are tested."""
    model.to(device)
    model.requires_grad_(trainable)
    if shard if shard is not None else dist.get_world_size() > 1:
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif dtype != torch.float32:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
    return model


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Whether this backward reduces gradients over processes: FSDP2 reduces on the last micro-batch of an optimizer
    step only, the others accumulate locally. A plain module (one process) has nothing to reduce."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@contextmanager
def unsharded(model: torch.nn.Module):
    """Keep an FSDP2 model's parameters gathered through a run of forwards (a decode loop: one all-gather per
    parameter group instead of one per token), at the cost of holding the whole model meanwhile; then reshard."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in groups:
            m.set_reshard_after_forward(
                m is not model, recurse=False
            )  # FSDP2's defaults: the root stays gathered after forward
            m.reshard()


def all_reduce(value, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or op) of a number or tensor over all processes, as a float64 tensor on the CPU."""
    tensor = torch.as_tensor(value, dtype=torch.float64).clone()
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()


def gather_objects(value) -> list:
    """Every process's `value` (any picklable object), in rank order."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_processes(values: dict) -> dict[str, float]:
    """Sum dicts of named numbers (floats, ints, 0-d tensors) over all processes, in one collective. The keys may
    differ between processes: a key missing on one counts 0 there."""
    gathered = gather_objects({key: float(value) for key, value in values.items()})
    total = {}
    for named in gathered:
        for key, value in named.items():
            total[key] = total.get(key, 0.0) + value
    return total


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to max_norm; returns the norm before clipping (0-d). FSDP2's gradients
    are DTensors, so the norm is one too: full_tensor() gives every process the whole value."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class FiniteSteps:
    """A non-finite loss or gradient never reaches the weights. Called between a step's backward and its optimizer
    step with the step's loss (this process's) and the global gradient norm: True where both are finite on every
    process; else the step is to be skipped (its weights and optimizer state stay as they are), and it is printed and
    counted (`skipped`, logged as train/nonfinite_steps); `max_in_a_row` skipped steps in a row stop the run with a
    one-line error, so no run trains on into NaN and exits 0."""

    def __init__(self, dtype: torch.dtype, max_in_a_row: int = 3):
        self.dtype, self.max_in_a_row, self.skipped, self.in_a_row = dtype, max_in_a_row, 0, 0

    def __call__(self, where: str, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """where: the optimizer step, as the log names it (e.g. "step 12")."""
        values = torch.tensor([float(loss), float(grad_norm)], dtype=torch.float64)
        if all_reduce((~torch.isfinite(values)).sum(), op=dist.ReduceOp.MAX).item() == 0:
            self.in_a_row = 0
            return True
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        print0(
            f"{where}: non-finite loss or gradient (this process: loss {values[0]:.4g}, gradient norm "
            f"{values[1]:.4g}); the step is skipped, the weights unchanged ({self.in_a_row} in a row, {self.skipped} "
            "in all)"
        )
        if self.in_a_row >= self.max_in_a_row:
            fail(
                f"{self.in_a_row} optimizer steps in a row, the last at {where}, had a non-finite loss or gradient "
                "and were skipped; nothing is saved. Try a lower --learning_rate or --max_grad_norm"
                + (", or --dtype fp32" if self.dtype != torch.float32 else "")
            )
        return False


def check_finite_weights(model: torch.nn.Module, what: str):
    """Stop with one line, on every process, rather than save non-finite weights."""
    bad = [
        name
        for name, p in model.named_parameters()
        if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
    ]
    if all_reduce(len(bad)).item():
        fail(f"not saving {what}: non-finite weights ({', '.join(bad[:3]) or 'on another process'})")


def save_pretrained(model, tokenizer, output_dir: str):
    """Gather the full state dict (a collective: every rank calls this) and save it on rank 0 as
    safetensors + config + tokenizer, loadable with `from_pretrained`. Never non-finite weights."""
    check_finite_weights(model, f"the model to '{output_dir}'")
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    dist.barrier()


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
            model_state, optim_state = get_state_dict(model, optimizer)
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
                model_state, optim_state = get_state_dict(model, optimizer)
                state = {"model": model_state, "optimizer": optim_state}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
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


def kept_lines(path: str, resume_step: int | None) -> list[str]:
    """The lines of a log of {"step", ...} objects that a run resumed at resume_step keeps (none for a new run)."""
    if resume_step is None or not os.path.exists(path):
        return []
    return [line for line in open(path) if json.loads(line)["step"] <= resume_step]


class Tracker:
    """metrics.jsonl (one JSON object per logged step: `step`, `time` and the metrics) and args.json in output_dir,
    tables (log_table) in wandb under --track, else in output_dir/NAME.jsonl. Only rank 0 writes. On --resume, the
    lines of these logs after the checkpoint's step are dropped."""

    LOGS = ("metrics.jsonl", "eval_samples.jsonl")
    SHOWN = {
        "train/loss": ("loss", "{:.4g}"),
        "train/tokens_per_s": ("tokens/s", "{:.0f}"),
        "eval/reward": ("eval/reward", "{:.3f}"),
        "eval/win_rate": ("win rate", "{:.3f}"),
    }

    def __init__(self, args, resume_step: int | None = None):
        self.enabled, self.bar, self.shown = is_main(), None, {}
        if not self.enabled:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        self.path, self.output_dir = os.path.join(args.output_dir, "metrics.jsonl"), args.output_dir
        kept = {name: kept_lines(os.path.join(args.output_dir, name), resume_step) for name in self.LOGS}
        for name, lines in kept.items():
            with open(os.path.join(args.output_dir, name), "w") as f:
                f.writelines(lines)
        # `time`: wall seconds of training so far (from here, after loading), a resumed run's earlier part included
        self.start = time.time() - (
            json.loads(kept["metrics.jsonl"][-1]).get("time", 0.0) if kept["metrics.jsonl"] else 0.0
        )
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb
            run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                config=asdict(args),
                name=run_name,
                resume="allow",
            )

    def progress(self, steps: range, total: int):
        """The steps as a progress bar (rank 0's) that shows the latest loss, tokens/s and eval/reward."""
        self.bar = tqdm(steps, initial=steps.start, total=total, disable=not self.enabled)
        return self.bar

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()} | {"time": time.time() - self.start}
        if torch.cuda.is_available():  # the peak since the run started: benchmarks/gpu.py compares it with TRL's
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.shown |= {
            short: form.format(metrics[name]) for name, (short, form) in self.SHOWN.items() if name in metrics
        }
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[tuple]):
        """A few (prompt, responses, rewards) examples: a wandb.Table under --track, else printed."""
        if not self.enabled or not samples:
            return
        if self.wandb is not None:
            table = self.wandb.Table(
                columns=["prompt", "responses", "rewards"], data=[[str(p), repr(r), repr(w)] for p, r, w in samples]
            )
            self.wandb.log({"samples": table}, step=step)
        else:
            for prompt, responses, rewards in samples:
                print(
                    f"  sample @ {step}: {str(prompt)[-200:]!r} -> {[r[:200] for r in responses]} rewards {rewards}",
                    flush=True,
                )

    def log_table(self, step: int, name: str, rows: list[dict]):
        """Rows of the same keys: a wandb.Table under --track, else lines {"step", **row} of output_dir/NAME.jsonl."""
        if not self.enabled or not rows:
            return
        if self.wandb is not None:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({name: table}, step=step)
        else:
            with open(os.path.join(self.output_dir, f"{name}.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)

    def finish(self):
        if self.enabled and self.wandb is not None:
            self.wandb.finish()


def cleanup():
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
