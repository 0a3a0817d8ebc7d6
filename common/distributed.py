"""One code path for 1 and N processes: torchrun init, the model on its device (FSDP2 across processes, a plain module
in one), mixed precision, reductions, and the guard between a step's backward and its optimizer step.

A single process runs as a world of size 1 (an in-memory store, no port), so every script reduces with collectives
whether it runs alone on a laptop or under torchrun; it trains a plain module, and several processes shard it with
FSDP2 (common/distributed.prepare_model).
"""

import os
import random
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from common.flags import fail


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
    # the policy draws from a generator of its own per process (common.online.OnlineSampler)
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
    trainable (where trainable, the weights that require gradients are those that train: all, or a LoRA model's
    adapters). Several processes (or shard=True): FSDP2, `fully_shard` each decoder layer and then the root, the
    gathered parameters cast to dtype, gradients reduced in fp32. One process: a plain module whose forward runs
    under torch.autocast(dtype), as FSDP2 at world size 1 would still copy and cast every parameter at each forward
    and backward and make the optimizer step over DTensors (pytorch/pytorch#134191). Both paths are tested."""
    model.to(device)
    if not trainable:
        model.requires_grad_(False)
    if shard if shard is not None else dist.get_world_size() > 1:
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif dtype != torch.float32:
        model.forward = torch.autocast(device.type, dtype=dtype)(model.forward)
        model.autocast_dtype = dtype  # for a loop of forwards to run under one autocast (common.generation)
    return model


def trainable_parameters(model: torch.nn.Module) -> list:
    """The weights that train, which the optimizer updates: all of a fully trained model, a LoRA model's adapters."""
    return [p for p in model.parameters() if p.requires_grad]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers model (causal LM, reward or value model), with LoRA adapters or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


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


def moments(x, mask):
    """Mean and (unbiased) variance of x where mask, over every process: ((), ()) float64."""
    total, squares, count = all_reduce(
        torch.stack([(x.double() * mask).sum(), (x.double() ** 2 * mask).sum(), mask.double().sum()])
    )
    mean = total / count
    return mean, (squares - count * mean**2) / (count - 1).clamp(min=1)


def whiten(x, mask):
    """(x - mean) / std over every process's masked values, zero outside the mask (the N+ details' masked_whiten)."""
    mean, var = moments(x, mask)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).float() * mask


def cleanup():
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
