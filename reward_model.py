"""Reward modelling (setup 2): a Bradley-Terry model of pairwise preferences.

For each pair, with y+ the preferred response (the generation with the higher reward; generation1 in
offline data), y- the other, and r(x, y) the scalar output of a sequence classifier:

    margins = r(x, y+) - r(x, y-)
    losses  = -log sigmoid(margins)                     (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1)
    loss    = sum_pairs weight * losses / num_pairs     (num_pairs: pairs in the global batch)

https://arxiv.org/abs/2203.02155

    python sft.py --output_dir runs/sft && python reward_model.py --model_name_or_path runs/sft
    torchrun --nproc_per_node 8 reward_model.py --model_name_or_path runs/sft-hh --dataset hh \
        --learning_rate 1e-5 --per_device_batch_size 8 --max_steps 2000 --output_dir runs/rm-hh

The model is an AutoModelForSequenceClassification (num_labels=1) whose body comes from a causal-LM
checkpoint and whose score head is new; r is read at the last token that is not padding
(common/model.load_reward_model). Score text with it through common/model.reward_scores.

Departures from the paper:
1. --center_rewards (on by default): after training, the mean reward of training responses is recorded
   as config.reward_mean, and reward_scores subtracts it, so rewards are centred at 0 for RL.
2. A pair's weight is the mean of its two generations' weights.
"""

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import get_cosine_schedule_with_warmup

from common.batch import BatchFactory, shard_batches, to_device, tokenize_records
from common.data import load_eval_records, load_records
from common.distributed import (
    FiniteSteps,
    Tracker,
    all_reduce,
    claim_output_dir,
    cleanup,
    clip_grad_norm,
    compute_dtype,
    fail,
    init_distributed,
    load_checkpoint,
    prepare_model,
    print0,
    save_checkpoint,
    save_pretrained,
    sum_over_processes,
    sync_gradients,
)
from common.flags import check_shared_args, require
from common.model import load_reward_model, load_tokenizer
from common.reweight import make_reweighter


@dataclass
class Args:
    # experiment
    exp_name: str = "reward_model"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order, sampling and new weights"""
    output_dir: str = "runs/reward_model"
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
    """longest prompt + response in tokens"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each example counts: none (the data's weights), confidence (online pairs: |2p - 1|, p the annotator's
    probability that generation1 is better), policy (WPO: the responses' probability under the policy),
    importance:PATH (pi / rho against the model PATH that wrote the data; offline), or python:MODULE:FUNCTION
    (common/reweight.py says which script takes which)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """what forwards compute in: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; weights and optimizer states stay
    fp32 (bf16 is mixed precision)"""

    # optimization
    max_steps: int = 200
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW (the toy default; real models need about 1e-5)"""
    per_device_batch_size: int = 32
    """examples (pairs, in the pairwise scripts) per micro-batch on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    warmup_steps: int = 10
    """linear warmup steps, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # reward model
    center_rewards: bool = True
    """after training, record the mean reward of training responses so scoring subtracts it"""
    num_center_pairs: int = 1024
    """training pairs used to estimate that mean"""

    # evaluation
    eval_every: int = 50
    """evaluate every this many steps (and at the start and the end)"""
    num_eval_examples: int = 512
    """held-out examples (pairs, in the pairwise scripts) for eval/loss"""


def pair_rewards(model, batch):
    """r(x, y) of both generations of every pair, (B, 2), in one concatenated forward."""
    ids = torch.cat([batch["generation1_token_ids"], batch["generation2_token_ids"]])  # (2B, T)
    attention_mask = torch.cat([batch["generation1_attention_mask"], batch["generation2_attention_mask"]])
    rewards = model(input_ids=ids, attention_mask=attention_mask).logits[:, 0].float()  # (2B,)
    return torch.stack(rewards.chunk(2), 1)


def chosen_rejected(values, batch):
    """(B, 2) values of (generation1, generation2) -> (chosen, rejected), each (B,): the chosen generation is the one
    with the higher reward in the data (generation1 in offline data)."""
    generation2_preferred = batch["generation2_reward"] > batch["generation1_reward"]
    return (
        torch.where(generation2_preferred, values[:, 1], values[:, 0]),
        torch.where(generation2_preferred, values[:, 0], values[:, 1]),
    )


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags all scripts share."""
    check_shared_args(args)
    require(args.num_center_pairs >= 1, "num_center_pairs", args.num_center_pairs, "must be at least 1")


def main(args: Args):
    check_args(args)
    reweighter = make_reweighter(args.reweighter)
    if reweighter is not None and reweighter.sees_policy:
        fail(f"--reweighter {args.reweighter} weighs responses by a policy's log-probs; a reward model has no policy")
    _, world_size, device = init_distributed(args.seed)
    dtype = compute_dtype(args.dtype, device)
    run_id = claim_output_dir(args.output_dir, args.resume, args.overwrite)  # before any work, so it fails fast
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    print0(
        f"{world_size} process(es) on {device.type}, computing in {dtype}; global batch {global_batch_size} pairs = "
        f"{args.per_device_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
        f"{world_size} processes"
    )

    tokenizer = load_tokenizer(args.model_name_or_path)
    records = load_records(
        args.dataset, args.dataset_split, "pairwise"
    )  # data first: bad data fails before a model loads
    rows = tokenize_records(records, tokenizer, args.max_length, args.max_prompt_length)
    factory = BatchFactory(
        rows,
        pad_token_id=tokenizer.pad_token_id,
        micro_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        group_by_length=args.group_by_length,
        reweighter=reweighter,
    )
    eval_records = load_eval_records(
        args.dataset, args.eval_dataset, args.eval_split, "pairwise", args.num_eval_examples
    )
    eval_rows = (
        tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length) if eval_records else []
    )
    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    model = load_reward_model(
        args.model_name_or_path,
        tokenizer,
        device,
        from_causal_lm=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = prepare_model(model, device, dtype)

    @torch.no_grad()
    def evaluate(batches) -> dict:
        """Loss (unweighted), accuracy, margin and mean reward over held-out pairs (every process's share)."""
        sums = defaultdict(float)
        for batch in batches:
            chosen_rewards, rejected_rewards = chosen_rejected(pair_rewards(model, batch), batch)
            sums["eval/loss"] += -F.logsigmoid(chosen_rewards - rejected_rewards).sum()
            sums["eval/rewards/accuracies"] += (chosen_rewards > rejected_rewards).float().sum()
            sums["eval/rewards/margins"] += (chosen_rewards - rejected_rewards).sum()
            sums["eval/rewards/mean"] += (chosen_rewards + rejected_rewards).sum() / 2
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        return {name: value / num_pairs for name, value in sum_over_processes(sums).items()} if num_pairs else {}

    optimizer = torch.optim.AdamW(model.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, model, optimizer, scheduler)
        factory.load_state_dict(data_state)
    tracker = Tracker(args, resume_step=start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate(eval_batches))

    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    model.train()
    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches of pairs for one optimizer step
        batches = [to_device(b, device) for b in factory.next_step()]
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        sums = defaultdict(float)  # per-step sums of the logged metrics, by name
        for i, batch in enumerate(batches):
            sync_gradients(model, i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: r(x, y) of both responses of each pair, (B, 2), then oriented into chosen and rejected
            chosen_rewards, rejected_rewards = chosen_rejected(pair_rewards(model, batch), batch)
            weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2  # (B,), departure 2

            # 3. loss: weighted losses over this micro-batch / global pair count; FSDP averages gradients
            # over processes, so * world_size makes the sum over processes the global mean
            margins = chosen_rewards - rejected_rewards
            losses = -F.logsigmoid(margins)
            loss = (weights * losses).sum() / num_pairs * world_size
            loss.backward()

            with torch.no_grad():  # diagnostics
                sums["train/loss"] += (weights * losses).sum()
                sums["rewards/chosen"] += chosen_rewards.sum()
                sums["rewards/rejected"] += rejected_rewards.sum()
                sums["rewards/margins"] += margins.sum()
                sums["rewards/accuracies"] += (margins > 0).float().sum()
        # 4. step, unless the loss or a gradient is not finite
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        if finite(f"step {step + 1}", sums["train/loss"], grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: one object per step in metrics.jsonl; each per-pair sum over all processes / the global pair count
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            num_tokens = sum(
                b["generation1_attention_mask"].sum() + b["generation2_attention_mask"].sum() for b in batches
            )
            num_tokens = all_reduce(num_tokens).item()
            elapsed = time.perf_counter() - step_start
            metrics |= {name: value / num_pairs for name, value in sum_over_processes(sums).items()}
            metrics |= {
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": num_tokens / elapsed,
                "train/pairs_per_s": num_pairs / elapsed,
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            eval_metrics = evaluate(eval_batches)
            metrics |= eval_metrics
            print0(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()))
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, factory.state_dict(), run_id)

    if args.center_rewards:  # departure 1
        center_rows = rows[: args.num_center_pairs]
        center_batches = shard_batches(center_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
        model.config.reward_mean = evaluate(center_batches)["eval/rewards/mean"]
        print0(f"centred: reward_mean {model.config.reward_mean:.4f} recorded in the config")
    save_pretrained(model, tokenizer, args.output_dir)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
