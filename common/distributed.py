"""One code path for 1 and N processes: torchrun init, FSDP2, reductions, saving, checkpoints, metrics.

A single process runs as a world of size 1 (an in-memory store, no port), so every script shards with
FSDP2 and reduces with collectives whether it runs alone on a laptop or under torchrun.
Checkpoints assume every rank sees the same --output_dir (one node, or a shared filesystem).
"""

import importlib
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


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
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the same on every rank: identical initial weights before sharding
    return rank, world_size, device


def shard_model(model: torch.nn.Module, device: torch.device, trainable: bool = True) -> torch.nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root. bf16 compute, fp32 master weights and
    fp32 gradient reduction on CUDA; fp32 throughout on CPU."""
    model.to(device)
    bf16 = device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.requires_grad_(trainable)
    return model


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
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: the root stays gathered after forward
            m.reshard()


def all_reduce(value, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or op) of a number or tensor over all processes, as a float64 tensor on the CPU."""
    tensor = torch.as_tensor(value, dtype=torch.float64).clone()
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()


def sum_counters(counter: dict) -> dict:
    """Sum dicts of counts over all processes (their keys may differ)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counter))
    total = {}
    for counts in gathered:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


def save_pretrained(model, tokenizer, output_dir: str):
    """Gather the full state dict (a collective: every rank calls this) and save it on rank 0 as
    safetensors + config + tokenizer, loadable with `from_pretrained`."""
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    dist.barrier()


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, data_state: dict, keep: int = 2):
    """Sharded model + optimizer (torch.distributed.checkpoint), scheduler, data position and each rank's
    RNG states, written to checkpoint-STEP.tmp and renamed when complete, so a process killed during a
    save leaves the last good checkpoint intact. The newest `keep` checkpoints are kept."""
    final, tmp = Path(output_dir) / f"checkpoint-{step}", Path(output_dir) / f"checkpoint-{step}.tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng_rank{dist.get_rank()}.pt")
    if is_main():
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_state}, tmp / "trainer_state.pt")
    dist.barrier()
    if is_main():
        tmp.rename(final)
        for old in checkpoints(output_dir)[: -max(keep, 1)]:
            shutil.rmtree(old)
    dist.barrier()


def checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def load_checkpoint(output_dir: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore the newest checkpoint into model/optimizer/scheduler and the RNGs; returns (step, data_state)."""
    found = checkpoints(output_dir)
    if not found:
        fail(f"--resume: no checkpoint-* folder in '{output_dir}'")
    path = found[-1]
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print0(f"{path} has no RNG state for rank {dist.get_rank()} (different world size); continuing with fresh RNG")
    print0(f"resumed from {path}")
    return trainer_state["step"], trainer_state["data"]


class Tracker:
    """metrics.jsonl (one JSON object per logged step) and args.json in output_dir, and wandb under
    --track. Only rank 0 writes. On --resume, lines logged after the checkpoint's step are dropped."""

    def __init__(self, args, resume_step: int | None = None):
        self.enabled = is_main()
        if not self.enabled:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        self.path = os.path.join(args.output_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            kept = [line for line in open(self.path) if json.loads(line)["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb
            run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=run_name, resume="allow")

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[tuple]):
        """A few (prompt, responses, rewards) examples: a wandb.Table under --track, else printed."""
        if not self.enabled or not samples:
            return
        if self.wandb is not None:
            table = self.wandb.Table(columns=["prompt", "responses", "rewards"], data=[[str(p), repr(r), repr(w)] for p, r, w in samples])
            self.wandb.log({"samples": table}, step=step)
        else:
            for prompt, responses, rewards in samples:
                print(f"  sample @ {step}: {str(prompt)[-200:]!r} -> {[r[:200] for r in responses]} rewards {rewards}", flush=True)

    def finish(self):
        if self.enabled and self.wandb is not None:
            self.wandb.finish()


def cleanup():
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
