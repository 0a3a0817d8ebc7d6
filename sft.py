"""Supervised fine-tuning (setup 1): maximise the likelihood of the dataset's responses.

    loss = sum_i generation1_weight_i * sum_{t in response_i} -log pi(y_it | x_i, y_i<t) / num_response_tokens

num_response_tokens counts the response tokens of the whole global batch (every micro-batch on every
process), so every response token in the batch counts the same, however the batch is split.

    python sft.py                     # the toy task on a CPU: eval/reward rises from ~0 to rho's ~0.76
    torchrun --nproc_per_node 8 sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset hh \
        --learning_rate 1e-5 --max_steps 2000 --per_device_batch_size 8 --output_dir runs/sft-hh

Departures from the usual recipe:
1. The loss is a mean over response tokens, never over prompt tokens (no "train on inputs").
2. Defaults are tuned for the toy task (a tiny model likes a large learning rate); real models need
   --learning_rate around 1e-5.
"""

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from transformers import get_cosine_schedule_with_warmup

from common.annotators import JudgeArgs
from common.batch import offline_data, shard_batches, to_device, training_tokens
from common.checkpoint import claim_output_dir, load_checkpoint, save_checkpoint, save_pretrained
from common.data import load_records
from common.distributed import (
    FiniteSteps,
    all_reduce,
    cleanup,
    clip_grad_norm,
    compute_dtype,
    init_distributed,
    prepare_model,
    print0,
    sum_over_processes,
    sync_gradients,
    trainable_parameters,
)
from common.evaluation import EvalArgs, held_out_eval
from common.flags import check_dataset_args, check_eval_args, check_shared_args
from common.generation import GenerationArgs
from common.logps import response_logps
from common.model import LoraArgs, add_lora, load_causal_lm, load_tokenizer
from common.reweight import check_reweighter, make_reweighter, self_normalise
from common.tracking import Means, Tracker


@dataclass
class Args:
    # experiment
    exp_name: str = "sft"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order, sampling and new weights"""
    output_dir: str = "runs/sft"
    """where the final model, args.json, metrics.jsonl and checkpoints go"""
    track: bool = False
    """log to wandb"""
    wandb_project_name: str = "align"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team or user)"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""
    overwrite: bool = False
    """start afresh in an output_dir that holds another run's checkpoints, deleting them"""
    save_every: int = 0
    """save a checkpoint every this many steps (0: never)"""
    log_every: int = 10
    """log metrics every this many steps"""

    # model and data
    model_name_or_path: str = "toy"
    """hub id or local path of the causal LM to start from (to align: an SFT model); `toy`: the embedded tiny Llama"""
    dataset: str = "toy"
    """toy (toy_shifted: its data from a noisier rho), hh, shp, ultrafeedback, a hub id, or a local
    .jsonl/.json/.parquet/.csv file"""
    dataset_split: str = "train"
    """split to train on"""
    eval_dataset: str | None = None
    """held-out data (default: --dataset's --eval_split; none for a local file)"""
    eval_split: str = "test"
    """split of the held-out data"""
    max_length: int = 512
    """longest prompt + response in tokens of the dataset's examples"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each example counts: none (the data's weights), policy (WPO: the response's probability under the
    policy), importance:PATH (pi / rho against the model PATH that wrote the data), or python:MODULE:FUNCTION
    (common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """what forwards compute in: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; weights and optimizer states stay
    fp32 (bf16 is mixed precision)"""
    lora: LoraArgs = field(default_factory=LoraArgs)

    # optimization
    max_steps: int = 600
    """optimizer steps"""
    learning_rate: float = 3e-3
    """peak learning rate of AdamW (the toy default; real models need about 1e-5)"""
    per_device_batch_size: int = 64
    """examples (pairs, in the pairwise scripts) per micro-batch on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    warmup_steps: int = 20
    """linear warmup steps, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # evaluation
    eval_every: int = 100
    """evaluate every this many steps (and at the start and the end)"""
    num_eval_examples: int = 512
    """held-out examples (pairs, in the pairwise scripts) that each evaluation scores as in training (eval/loss,
    eval/rewards/*); offline runs"""
    eval: EvalArgs = field(default_factory=EvalArgs)
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags the scripts share."""
    check_shared_args(args)
    check_dataset_args(args)
    check_eval_args(args.eval, args.generation.max_new_tokens, args.dataset)
    check_reweighter(args.reweighter, ("none", "policy", "importance", "python"), "sft.py")


def main(args: Args):
    check_args(args)
    _, world_size, device = init_distributed(args.seed)
    dtype = compute_dtype(args.dtype, device)
    run_id = claim_output_dir(args.output_dir, args.resume, args.overwrite)  # before any work, so it fails fast
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    print0(
        f"{world_size} process(es) on {device.type}, computing in {dtype}; global batch {global_batch_size} = "
        f"{args.per_device_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {world_size} "
        "processes"
    )

    tokenizer = load_tokenizer(args.model_name_or_path)
    reweighter = make_reweighter(args.reweighter)
    sees_policy = reweighter is not None and reweighter.sees_policy
    records = load_records(args.dataset, args.dataset_split, "sft")  # data first: bad data fails before a model loads
    factory, eval_rows = offline_data(args, records, "sft", tokenizer, reweighter)
    if reweighter is not None and reweighter.behaviour_path:  # importance: rho's log-probs, once
        used = factory.indices_until(args.max_steps)
        reweighter.prepare(factory.rows, used, tokenizer, device, dtype, args.per_device_batch_size)
    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    model = load_causal_lm(args.model_name_or_path, tokenizer, device, args.gradient_checkpointing)
    model = prepare_model(add_lora(model, args.lora, args.model_name_or_path), device, dtype)
    print0(f"model: {args.model_name_or_path}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    held_out = held_out_eval(args, tokenizer, device, dtype)

    @torch.no_grad()
    def evaluate(step: int, tracker: Tracker) -> dict:
        """eval/loss: held-out NLL per response token (unweighted); the held-out samples' eval/*
        (common/evaluation.py)."""
        means = Means()
        for batch in eval_batches:
            ids, mask = batch["generation1_token_ids"], batch["generation1_attention_mask"]
            logps, response_mask = response_logps(model, ids, mask, batch["generation1_response_mask"])
            means.add("eval/loss", -logps, response_mask)
        metrics = means.result()
        if held_out is not None:
            metrics |= held_out(step, model, None, tracker)
        return metrics

    optimizer = torch.optim.AdamW(
        trainable_parameters(model), args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, model, optimizer, scheduler)
        factory.load_state_dict(data_state)
    derived = {"global_batch_size": global_batch_size, "world_size": world_size}
    tracker = Tracker(args, run_id, derived, resume_step=start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate(0, tracker))

    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    model.train()
    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches for one optimizer step
        batches = [to_device(b, device) for b in factory.next_step()]
        num_response_tokens = all_reduce(sum(b["generation1_response_mask"].sum() for b in batches)).item()
        nll_sum = 0.0
        for i, batch in enumerate(batches):
            sync_gradients(model, i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: log-probs of the response tokens, (B, K), zero outside the responses
            ids, mask = batch["generation1_token_ids"], batch["generation1_attention_mask"]
            weights = batch["generation1_weight"]
            if sees_policy:  # factors from this forward (WPO, importance weights), constants to the loss
                logps, _, seen = response_logps(model, ids, mask, batch["generation1_response_mask"], with_stats=True)
                weights = reweighter.reweigh(batch, seen, weights)
            else:
                logps, _ = response_logps(model, ids, mask, batch["generation1_response_mask"])
            # 3. loss: weighted NLL summed over this micro-batch's response tokens, divided by the global
            # token count. Summing over micro-batches gives the global mean's share of this process;
            # FSDP averages gradients over processes, so * world_size makes their sum the global mean.
            nll = -(weights[:, None] * logps).sum()
            loss = nll / num_response_tokens * world_size
            loss.backward()
            nll_sum += nll.detach()
        # 4. step, unless the loss or a gradient is not finite (importance weights: every factor over the step's mean
        # factor, all micro-batches and processes)
        nll_sum /= self_normalise(reweighter, model)
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        if finite(f"step {step + 1}", nll_sum, grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: one object per step in metrics.jsonl
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - step_start
            metrics |= {
                "train/loss": all_reduce(nll_sum).item() / num_response_tokens,
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": all_reduce(training_tokens(batches)).item() / elapsed,
                "train/examples_per_s": sum(len(b["prompt"]) for b in batches) * world_size / elapsed,
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            metrics |= evaluate(step + 1, tracker)
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, factory.state_dict(), run_id)

    save_pretrained(model, tokenizer, args.output_dir, args.lora.merge)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
