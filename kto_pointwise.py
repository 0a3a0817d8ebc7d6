"""Kahneman-Tversky optimisation from pointwise feedback (setup 4; setup 5 with --online).

Each example is one response y to a prompt x, labelled desirable or undesirable; no pairs. With r the implicit
reward and z_ref the reference point (Ethayarajh et al. 2024, eq. 8):

    rewards   = log pi(y|x) - log ref(y|x)                       (summed over the response's tokens)
    kl        = mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)]     y'_j: another example's response (a mismatched pair)
    z_ref     = max(0, kl)                                        no gradient flows through it
    v         = desirable_weight   * sigmoid(beta * (rewards - z_ref))   for a desirable y
                undesirable_weight * sigmoid(beta * (z_ref - rewards))   for an undesirable y
    losses    = lambda_y - v                                      (lambda_y: the weight of y's class)
    loss      = sum_examples weights * losses / num_examples      (num_examples: examples in the global batch)

https://arxiv.org/abs/2402.01306

The mismatched pairs pair each example of the global step (every micro-batch on every process) with the response
of the next example of that step, in the order of their positions (common.batch's `position`), and kl is their mean
over the whole step: so z_ref, and the result, do not depend on how the batch is split. It costs one forward
without gradient per example, before the training forwards (it must be known before the first loss).

    python sft.py --output_dir runs/sft && python kto_pointwise.py --model_name_or_path runs/sft
    python kto_pointwise.py --model_name_or_path runs/sft --online
    torchrun --nproc_per_node 8 kto_pointwise.py --model_name_or_path runs/sft-hh --dataset hh --online \\
        --annotator reward_model:runs/rm-hh --generation.max_new_tokens 256 --learning_rate 5e-7

Departures from the paper:
1. The reference is the initial policy. Offline, its log-probs are computed once before training, for the examples
   and for their mismatched pairs (--precompute_ref_logps), and the reference model is dropped.
2. kl is estimated over the global step, not per micro-batch (as TRL and HALOs do).
3. Pairwise datasets are unpaired: the preferred response desirable, the other undesirable (as the paper's
   experiments do), in the shuffled data stream.
4. Online, the annotator's scores become labels by `label_threshold`: at or above --label_threshold (the median
   of the global step's scores by default) desirable, below it undesirable. A score equal to the median counts as
   desirable: with few distinct scores (a verifiable reward) many samples sit on it, often the best score there is.
"""

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from transformers import get_cosine_schedule_with_warmup

from common import toy
from common.annotators import JudgeArgs, make_annotator
from common.batch import BatchFactory, OnlineBatchFactory, pad, shard_batches, to_device, tokenize_records
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
    gather_objects,
    init_distributed,
    load_checkpoint,
    prepare_model,
    print0,
    save_checkpoint,
    save_pretrained,
    sum_over_processes,
    sync_gradients,
)
from common.evaluation import held_out_eval
from common.flags import check_shared_args, require
from common.generation import GenerationArgs
from common.logps import shared_prompt_logps
from common.model import add_reference_logps, load_causal_lm, load_tokenizer
from common.reweight import make_reweighter, self_normalise


@dataclass
class Args:
    # experiment
    exp_name: str = "kto"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order, sampling and new weights"""
    output_dir: str = "runs/kto"
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
    max_steps: int = 150
    """optimizer steps"""
    learning_rate: float | None = None
    """peak learning rate of AdamW (default: 1e-5 offline, 4e-4 with --online, where the samples move with the
    policy)"""
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

    # KTO
    beta: float = 0.1
    """strength of the pull towards the reference (KTO's beta)"""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples"""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples"""
    precompute_ref_logps: bool = True
    """offline: score every example and its mismatched pair with the reference once before training"""

    # online
    online: bool = False
    """sample responses from the policy and label them with --annotator, instead of the dataset's responses"""
    annotator: str = "toy"
    """toy, reward_model:PATH, judge:PATH, http:URL, or python:MODULE:FUNCTION (common/annotators.py)"""
    label_threshold: str = "median"
    """online: scores at or above it are desirable, below it undesirable: median or mean (of the step), or a number"""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)

    # evaluation
    eval_every: int = 50
    """evaluate every this many steps (and at the start and the end)"""
    num_eval_examples: int = 512
    """held-out examples (pairs, in the pairwise scripts) for eval/loss"""
    num_eval_prompts: int = 512
    """held-out prompts sampled at each evaluation (eval/score, eval/win_rate, eval/kl; eval/reward on toy); 0: none"""
    eval_annotator: str | None = None
    """judge of the held-out samples, in --annotator's forms, or none; default: the training annotator (--online,
    rl_ppo.py), toy on the toy task, else none (then nothing is sampled)"""
    eval_temperature: float = 1.0
    """sampling temperature of the held-out samples (1.0 measures the policy itself, not its mode)"""
    eval_batch_size: int = 128
    """held-out prompts sampled at a time on each process"""


def kto_loss(rewards, z_ref, desirable, beta, desirable_weight, undesirable_weight):
    """Per-example losses (B,), unweighted: lambda_y - v (eq. 8), from rewards = log pi - log ref (B,), the reference
    point z_ref (a number) and which examples are desirable (B,) bool."""
    v_desirable = desirable_weight * torch.sigmoid(beta * (rewards - z_ref))
    v_undesirable = undesirable_weight * torch.sigmoid(beta * (z_ref - rewards))
    return torch.where(desirable, desirable_weight - v_desirable, undesirable_weight - v_undesirable)


def sequence_logps(model, batch, response_ids=None, response_mask=None, with_stats=False):
    """log pi(y|x) of each example, (B,), summed over the response's tokens; with response_ids, of those responses
    to the batch's prompts instead (the mismatched pairs). with_stats: also the per-token view that a reweighter of
    the policy reads (common/reweight.py)."""
    if response_ids is None:
        response_ids, response_mask = (
            batch["generation1_response_token_ids"],
            batch["generation1_response_attention_mask"],
        )
    inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], response_ids, response_mask
    if not with_stats:
        return shared_prompt_logps(model, *inputs).sum(-1)
    token_logps, seen = shared_prompt_logps(model, *inputs, with_stats=True)
    return token_logps.sum(-1), seen


def mismatched_responses(batches, pad_token_id):
    """The mismatched pair of every example: the response of the next example of the global step, by position
    (cyclically), gathered from every process. (response_ids, response_mask) per batch."""
    mine = {}
    for batch in batches:
        for position, ids, mask in zip(
            batch["position"].tolist(),
            batch["generation1_response_token_ids"],
            batch["generation1_response_attention_mask"],
        ):
            mine[position] = ids[mask.bool()].tolist()
    responses = {position: ids for part in gather_objects(mine) for position, ids in part.items()}
    order = sorted(responses)
    successor = {position: order[(i + 1) % len(order)] for i, position in enumerate(order)}
    device = batches[0]["prompt_token_ids"].device
    return [
        tuple(t.to(device) for t in pad([responses[successor[p]] for p in batch["position"].tolist()], pad_token_id))
        for batch in batches
    ]


def label_threshold(scores, spec):
    """Online: the score that separates desirable from undesirable responses (departure 4), from the scores (N,) of
    this process's examples and every other process's: their median or mean over the global step, or a number."""
    everything = [score for part in gather_objects(scores.tolist()) for score in part]
    if spec == "median":
        return statistics.median(everything)
    if spec == "mean":
        return statistics.fmean(everything)
    return float(spec)


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags all scripts share."""
    check_shared_args(args)
    require(args.beta > 0, "beta", args.beta, "must be above 0")
    require(args.desirable_weight > 0, "desirable_weight", args.desirable_weight, "must be above 0")
    require(args.undesirable_weight > 0, "undesirable_weight", args.undesirable_weight, "must be above 0")
    if args.label_threshold not in ("median", "mean"):
        try:
            require(
                math.isfinite(float(args.label_threshold)), "label_threshold", args.label_threshold, "must be finite"
            )
        except ValueError:
            fail(f"--label_threshold {args.label_threshold}: must be median, mean or a number")
    if args.reweighter == "confidence":
        fail("--reweighter confidence weighs pairs by the annotator's probability; KTO's examples are single responses")


def main(args: Args):
    # as in dpo_pairwise.py, a fixed dataset over-optimises at online rates; KTO's sigmoid (not log-sigmoid) loss
    # has smaller gradients than DPO's, and takes a larger online rate (tuned on the toy task)
    if args.learning_rate is None:
        args.learning_rate = 4e-4 if args.online else 1e-5
    check_args(args)
    _, world_size, device = init_distributed(args.seed)
    dtype = compute_dtype(args.dtype, device)
    run_id = claim_output_dir(args.output_dir, args.resume, args.overwrite)  # before any work, so it fails fast
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    if global_batch_size < 2:
        fail("KTO pairs each example with another of its step (kl): the global batch needs at least 2 examples")
    print0(
        f"{world_size} process(es) on {device.type}, computing in {dtype}; global batch {global_batch_size} = "
        f"{args.per_device_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {world_size} "
        f"processes; learning rate {args.learning_rate}"
    )

    tokenizer = load_tokenizer(args.model_name_or_path)
    reweighter = make_reweighter(args.reweighter)
    sees_policy = reweighter is not None and reweighter.sees_policy
    # data first: bad data fails before a model loads; online, the dataset's prompts only
    records = load_records(args.dataset, args.dataset_split, "prompt" if args.online else "pointwise")
    annotator = make_annotator(args.annotator, device, args.judge, dtype) if args.online else None
    policy = load_causal_lm(args.model_name_or_path, tokenizer, device, args.gradient_checkpointing)
    policy = prepare_model(policy, device, dtype)
    eval_rows = []
    if args.online:  # responses are sampled and scored every step; label_threshold labels them
        factory = OnlineBatchFactory(
            records,
            tokenizer,
            policy,
            annotator,
            num_generations=1,
            label=lambda score: None if score is None else (score,),
            generation=args.generation,
            max_prompt_length=args.max_prompt_length,
            micro_batch_size=args.per_device_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seed=args.seed,
            group_by_length=args.group_by_length,
            reweighter=reweighter,
            sample_reward=toy.true_reward if toy.is_toy(args.dataset) else None,
        )
    else:
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
        num_desirable = sum(row["generation1_reward"] == 1.0 for row in rows)
        num_undesirable = len(rows) - num_desirable
        ratio = args.desirable_weight * num_desirable / max(args.undesirable_weight * num_undesirable, 1e-9)
        print0(
            f"{num_desirable} desirable, {num_undesirable} undesirable examples: "
            f"desirable_weight * n_D / (undesirable_weight * n_U) = {ratio:.3f}"
        )
        if not 1 <= ratio <= 4 / 3:
            print0(
                "warning: the KTO paper advises 1 <= desirable_weight * n_D / (undesirable_weight * n_U) <= 4/3 "
                "(section 4.3); set --desirable_weight or --undesirable_weight to bring it there"
            )
        eval_records = load_eval_records(
            args.dataset, args.eval_dataset, args.eval_split, "pointwise", args.num_eval_examples
        )
        if eval_records:
            eval_rows = tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length)
            # equal shares: FSDP forwards are collectives
            eval_rows = eval_rows[: len(eval_rows) // world_size * world_size]
        if reweighter is not None and reweighter.behaviour_path:  # importance: rho's log-probs, once
            reweighter.prepare(factory.rows_until(args.max_steps), tokenizer, device, dtype, args.per_device_batch_size)

    # where the reference log-probs come from, chosen here, once: computed before training for the examples and
    # their mismatched pairs (offline), or the reference model on each step's samples (online). The reference is
    # the initial policy, loaded again (so --resume gets it too) and frozen.
    reference = load_causal_lm(args.model_name_or_path, tokenizer, device)
    reference = prepare_model(reference, device, dtype, trainable=False).eval()
    if args.precompute_ref_logps and not args.online:
        start, G = time.perf_counter(), global_batch_size

        def partner(p):  # the mismatched pair of stream position p: the next position of its step, cyclically
            return p - p % G + (p % G + 1) % G

        mismatched = [
            {**factory.row_at(p), "generation1_response_ids": factory.row_at(partner(p))["generation1_response_ids"]}
            for p in range(args.max_steps * G)
        ]
        add_reference_logps(
            reference,
            factory.rows_until(args.max_steps) + eval_rows + mismatched,
            tokenizer.pad_token_id,
            args.per_device_batch_size,
        )
        kl_reference = torch.tensor([row["generation1_reference_logps"] for row in mismatched], device=device)
        seconds = time.perf_counter() - start
        print0(f"reference log-probs of {len(mismatched)} examples and their mismatched pairs in {seconds:.1f} s")
        reference = None  # training holds one model

        def reference_logps(batch, response_ids=None, response_mask=None):
            if response_ids is None:
                return batch["generation1_reference_logps"]
            return kl_reference[batch["position"]]  # the mismatched pair of each position, as computed above
    else:

        def reference_logps(batch, response_ids=None, response_mask=None):
            with torch.no_grad():
                return sequence_logps(reference, batch, response_ids, response_mask)

    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    held_out = held_out_eval(args, tokenizer, device, annotator)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        """eval/rewards/* (mean beta * r) of held-out desirable and undesirable responses; the held-out samples'
        eval/* (common/evaluation.py; eval/kl where the reference model is kept)."""
        metrics, sums = {}, defaultdict(float)
        for batch in eval_batches:
            rewards = args.beta * (sequence_logps(policy, batch) - reference_logps(batch))
            desirable = batch["generation1_reward"] == 1.0
            sums["eval/rewards/desirable"] += (rewards * desirable).sum()
            sums["eval/rewards/undesirable"] += (rewards * ~desirable).sum()
            sums["desirable"] += desirable.sum()
        if eval_rows:
            totals = sum_over_processes(sums)
            metrics["eval/rewards/desirable"] = totals["eval/rewards/desirable"] / max(totals["desirable"], 1)
            metrics["eval/rewards/undesirable"] = totals["eval/rewards/undesirable"] / max(
                len(eval_rows) - totals["desirable"], 1
            )
            metrics["eval/rewards/margins"] = metrics["eval/rewards/desirable"] - metrics["eval/rewards/undesirable"]
        if held_out is not None:
            metrics |= held_out(step, policy, reference, tracker)
        return metrics

    optimizer = torch.optim.AdamW(policy.parameters(), args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, policy, optimizer, scheduler)
        factory.load_state_dict(data_state)
    tracker = Tracker(args, resume_step=start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate(0))

    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    policy.train()
    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches for one optimizer step (sampled + scored when --online), and
        # which examples are desirable
        batches = [to_device(b, device) for b in factory.next_step()]
        num_examples = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        sums = defaultdict(float)  # per-step sums of the logged metrics, by name
        if args.online:  # scores -> labels, by a threshold over the global step (departure 4)
            scores = torch.cat([b["generation1_reward"][b["generation1_weight"] > 0] for b in batches])
            threshold = label_threshold(scores, args.label_threshold)
            for b in batches:
                b["desirable"] = b["generation1_reward"] >= threshold
        else:
            for b in batches:
                b["desirable"] = b["generation1_reward"] == 1.0

        # 2. kl, then z_ref: the mismatched pairs of the whole global step, without gradient
        kl_start = time.perf_counter()
        with torch.no_grad():
            kl_sum = 0.0
            for batch, (response_ids, response_mask) in zip(
                batches, mismatched_responses(batches, tokenizer.pad_token_id)
            ):
                kl_policy_logps = sequence_logps(policy, batch, response_ids, response_mask)
                kl_sum += (kl_policy_logps - reference_logps(batch, response_ids, response_mask)).sum()
            kl = all_reduce(kl_sum).item() / num_examples
            z_ref = max(kl, 0.0)
        kl_seconds = time.perf_counter() - kl_start

        for i, batch in enumerate(batches):
            sync_gradients(policy, i == len(batches) - 1)  # reduce gradients once per step
            # 3. forward: log-probs of each example's response, (B,)
            desirable, weights = batch["desirable"], batch["generation1_weight"]
            if sees_policy:  # factors from this forward (WPO, importance weights), constants to the loss
                policy_logps, seen = sequence_logps(policy, batch, with_stats=True)
                weights = reweighter.reweigh(batch, seen, weights)
            else:
                policy_logps = sequence_logps(policy, batch)

            # 4. loss: weighted losses summed over this micro-batch, divided by the global example count; the
            # micro-batches add up to this process's share of the global mean, and FSDP averages gradients
            # over processes, so * world_size makes their sum the global mean
            rewards = policy_logps - reference_logps(batch)  # r, (B,)
            losses = kto_loss(rewards, z_ref, desirable, args.beta, args.desirable_weight, args.undesirable_weight)
            loss = (weights * losses).sum() / num_examples * world_size
            loss.backward()

            with torch.no_grad():  # diagnostics: implicit rewards beta * r of each class (examples of weight 0 aside)
                counted_desirable, counted_undesirable = desirable & (weights > 0), ~desirable & (weights > 0)
                sums["train/loss"] += (weights * losses).sum()
                sums["rewards/desirable"] += (args.beta * rewards * counted_desirable).sum()
                sums["rewards/undesirable"] += (args.beta * rewards * counted_undesirable).sum()
                sums["logps/desirable"] += (policy_logps * counted_desirable).sum()
                sums["logps/undesirable"] += (policy_logps * counted_undesirable).sum()
                sums["num_desirable"] += counted_desirable.sum()
                sums["num_undesirable"] += counted_undesirable.sum()
        # 5. step, unless the loss or a gradient is not finite (importance weights: every factor over the step's mean
        # factor, all micro-batches and processes)
        sums["train/loss"] /= self_normalise(reweighter, policy)
        grad_norm = clip_grad_norm(policy, args.max_grad_norm)
        if finite(f"step {step + 1}", sums["train/loss"], grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 6. log: one object per step in metrics.jsonl
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            totals, elapsed = sum_over_processes(sums), time.perf_counter() - step_start
            num_desirable, num_undesirable = max(totals["num_desirable"], 1), max(totals["num_undesirable"], 1)
            num_tokens = all_reduce(sum(b["generation1_attention_mask"].sum() for b in batches)).item()
            metrics |= {
                "train/loss": totals["train/loss"] / num_examples,
                "kl": kl,  # the estimate before clamping: z_ref = max(0, kl)
                "z_ref": z_ref,
                "rewards/desirable": totals["rewards/desirable"] / num_desirable,
                "rewards/undesirable": totals["rewards/undesirable"] / num_undesirable,
                "rewards/margins": totals["rewards/desirable"] / num_desirable
                - totals["rewards/undesirable"] / num_undesirable,
                "logps/desirable": totals["logps/desirable"] / num_desirable,
                "logps/undesirable": totals["logps/undesirable"] / num_undesirable,
                "train/desirable_fraction": totals["num_desirable"] / num_examples,
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": num_tokens / elapsed,
                "train/examples_per_s": num_examples / elapsed,
                "train/kl_seconds": kl_seconds,  # what the mismatched pairs cost this step
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
            if args.online:
                metrics |= factory.metrics(sum_over_processes(factory.stats))
                metrics |= {"online/threshold": threshold}
                tracker.log_samples(step + 1, factory.samples)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            eval_metrics = evaluate(step + 1)
            metrics |= eval_metrics
            print0(
                f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items() if "per_s" not in k)
            )
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, policy, optimizer, scheduler, factory.state_dict(), run_id)

    save_pretrained(policy, tokenizer, args.output_dir)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
