"""Kahneman-Tversky optimisation from pointwise feedback (setup 4; setup 5 with --online).

Each example is one response y to a prompt x, labelled desirable or undesirable; no pairs. With r the implicit
reward and z_ref the reference point (Ethayarajh et al. 2024, eq. 8):

    rewards   = log pi(y|x) - log ref(y|x)                       (summed over the response's tokens)
    kl        = mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)]     y'_j: another example's response (a mismatched pair)
    z_ref     = max(0, kl)                                        no gradient flows through it
    v         = desirable_weight   * sigmoid(beta * (rewards - z_ref))   for a desirable y
                undesirable_weight * sigmoid(beta * (z_ref - rewards))   for an undesirable y
    losses    = lambda_y - v                                      (lambda_y: the weight of y's class)
    loss      = sum_examples weights * losses / num_examples      (num_examples: trainable examples of the global batch)

https://arxiv.org/abs/2402.01306

The mismatched pairs (`mismatched_partners`) pair each example of the global step (every micro-batch on every process)
with the response of the next example of that step, in the order of their positions (common.batch's `position`), that
answers another prompt; kl is their mean over the whole step: so z_ref, and the result, do not depend on how the batch
is split. It costs one forward without gradient per example, before the training forwards (it must be known before the
first loss).

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
   Samples the annotator fails on are dropped, and more prompts sampled (common/online.py).
"""

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from transformers import get_cosine_schedule_with_warmup

from common import online
from common.annotators import JudgeArgs, make_annotator
from common.batch import micro_batches, offline_data, pad, shard_batches, to_device, training_tokens
from common.checkpoint import claim_output_dir, load_checkpoint, save_checkpoint, save_pretrained
from common.data import load_records
from common.distributed import (
    FiniteSteps,
    all_reduce,
    cleanup,
    clip_grad_norm,
    compute_dtype,
    gather_objects,
    init_distributed,
    prepare_model,
    print0,
    sum_over_processes,
    sync_gradients,
    trainable_parameters,
)
from common.evaluation import EvalArgs, held_out_eval
from common.flags import check_dataset_args, check_eval_args, check_online_args, check_shared_args, fail, require
from common.generation import GenerationArgs
from common.logps import precompute_logps, shared_prompt_logps
from common.model import LoraArgs, adapters_off, add_lora, load_causal_lm, load_tokenizer
from common.reweight import check_reweighter, make_reweighter, self_normalise
from common.tracking import Means, Tracker


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
    """longest prompt + response in tokens of the dataset's examples"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each example counts: none (the data's weights), policy (WPO: the response's probability under the
    policy), importance:PATH (offline: pi / rho against the model PATH that wrote the data), or python:MODULE:FUNCTION
    (common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """what forwards compute in: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; weights and optimizer states stay
    fp32 (bf16 is mixed precision)"""
    lora: LoraArgs = field(default_factory=LoraArgs)

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
    """held-out examples (pairs, in the pairwise scripts) that each evaluation scores as in training (eval/loss,
    eval/rewards/*); offline runs"""
    eval: EvalArgs = field(default_factory=EvalArgs)


def kto_loss(policy_logps, reference_logps, z_ref, desirable, args):
    """The loss of every example (B,), unweighted: lambda_y - v (eq. 8), and its diagnostics ({name: (values, mask)},
    no gradient), from log pi(y|x) and log ref(y|x) (B,), the reference point z_ref (a number) and which examples are
    desirable (B,) bool: the loop's and the evaluation's, written once."""
    rewards = policy_logps - reference_logps  # r
    v_desirable = args.desirable_weight * torch.sigmoid(args.beta * (rewards - z_ref))
    v_undesirable = args.undesirable_weight * torch.sigmoid(args.beta * (z_ref - rewards))
    losses = torch.where(desirable, args.desirable_weight - v_desirable, args.undesirable_weight - v_undesirable)
    with torch.no_grad():  # implicit rewards beta * r and log-probs of each class
        return losses, {
            "rewards/desirable": (args.beta * rewards, desirable),
            "rewards/undesirable": (args.beta * rewards, ~desirable),
            "logps/desirable": (policy_logps, desirable),
            "logps/undesirable": (policy_logps, ~desirable),
            "train/desirable_fraction": (desirable.float(), None),
        }


def sequence_logps(model, batch, response_ids=None, response_mask=None, with_stats=False):
    """log pi(y|x) of each example, (B,), summed over the response's tokens; with response_ids, of those responses
    to the batch's prompts instead (the mismatched pairs). with_stats: also the per-token view that a reweighter of
    the policy reads (common/reweight.py)."""
    if response_ids is None:
        response_ids = batch["generation1_response_token_ids"]
        response_mask = batch["generation1_response_attention_mask"]
    inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], response_ids, response_mask
    if not with_stats:
        return shared_prompt_logps(model, *inputs).sum(-1)
    token_logps, seen = shared_prompt_logps(model, *inputs, with_stats=True)
    return token_logps.sum(-1), seen


def mismatched_partners(examples: list[tuple[int, str]]) -> dict[int, int]:
    """The mismatched pair of each example of a global step, from (position, prompt) of all of them: position ->
    the position of the next example (by position, cyclically) whose prompt is another one (where none is, the next)."""
    order = sorted(examples)
    partners = {}
    for i, (position, prompt) in enumerate(order):
        after = [order[(i + j) % len(order)] for j in range(1, len(order))]
        partners[position] = next((p for p, other in after if other != prompt), after[0][0] if after else position)
    return partners


def mismatched_responses(batches, pad_token_id):
    """The mismatched pair of every example of the global step (`mismatched_partners`), its response gathered from
    whichever process holds it: (response_ids, response_mask) per batch."""
    mine = {}
    for batch in batches:
        ids, mask = batch["generation1_response_token_ids"], batch["generation1_response_attention_mask"]
        for i, position in enumerate(batch["position"].tolist()):
            mine[position] = (batch["prompt"][i], ids[i][mask[i].bool()].tolist())
    step = {position: example for part in gather_objects(mine) for position, example in part.items()}
    partners = mismatched_partners([(position, prompt) for position, (prompt, _) in step.items()])
    device = batches[0]["prompt_token_ids"].device
    return [
        tuple(t.to(device) for t in pad([step[partners[p]][1] for p in batch["position"].tolist()], pad_token_id))
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
    """Every flag's range, before any work; common.flags checks the flags the scripts share."""
    check_shared_args(args)
    check_dataset_args(args)
    check_eval_args(args.eval, args.generation.max_new_tokens, args.dataset)
    if args.online:
        check_online_args(args)
    check_reweighter(args.reweighter, ("none", "policy", "importance", "python"), "kto_pointwise.py")
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
    policy = prepare_model(add_lora(policy, args.lora, args.model_name_or_path), device, dtype)
    eval_rows = []
    if args.online:  # responses are sampled and scored every step; label_threshold labels them
        size = args.per_device_batch_size * args.gradient_accumulation_steps
        data = sampler = online.OnlineSampler.from_args(args, records, tokenizer, annotator, device, size)
    else:
        factory, eval_rows = offline_data(args, records, "pointwise", tokenizer, reweighter)
        data, rows = factory, factory.rows
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
        if reweighter is not None and reweighter.behaviour_path:  # importance: rho's log-probs, once
            used = factory.indices_until(args.max_steps)
            reweighter.prepare(factory.rows, used, tokenizer, device, dtype, args.per_device_batch_size)

    # The reference is the initial policy: with LoRA the policy with its adapters off (common.model.adapters_off), else
    # loaded again (so --resume gets it too) and frozen. A model that scores each step's examples and mismatched pairs
    # (online, and offline with --no-precompute_ref_logps), or offline a table of its log-probs, computed once before
    # training (departure 1): "train" and "eval" by a batch's `index` (its dataset row), "kl" by its `position` (the
    # mismatched pair of every position of the run's steps, by the rule the loop uses: mismatched_partners).
    reference_model, reference_table = policy, None
    if not args.lora.r:
        reference_model = load_causal_lm(args.model_name_or_path, tokenizer, device)
        reference_model = prepare_model(reference_model, device, dtype, trainable=False).eval()
    if args.precompute_ref_logps and not args.online:
        start, used, G = time.perf_counter(), factory.indices_until(args.max_steps), global_batch_size
        mismatched = []
        for step in range(args.max_steps):
            step_rows = [factory.row_at(p) for p in range(step * G, (step + 1) * G)]
            partners = mismatched_partners([(row["position"], row["prompt"]) for row in step_rows])
            for row in step_rows:
                response = step_rows[partners[row["position"]] - step * G]["generation1_response_ids"]
                mismatched.append(row | {"generation1_response_ids": response})
        rows = [factory.rows[i] for i in used] + eval_rows + mismatched
        with adapters_off(reference_model):
            logps = precompute_logps(reference_model, rows, tokenizer.pad_token_id, args.per_device_batch_size)[:, 0]
        reference_table = {"train": torch.full((len(factory.rows),), math.nan), "kl": logps[-len(mismatched) :]}
        reference_table["train"][used], reference_table["eval"] = (
            logps[: len(used)],
            logps[len(used) : -len(mismatched)],
        )
        print0(
            f"reference log-probs of {len(rows)} examples and mismatched pairs in {time.perf_counter() - start:.1f} s "
            "(no eval/kl)"
        )
        reference_model = None  # training holds one model (with LoRA: the policy only, as ever)

    def reference_logps(batch, split="train", response_ids=None, response_mask=None):
        """log ref(y|x) of each example of the batch (B,); with response_ids, of the mismatched pairs' responses."""
        if reference_table is not None:
            where = batch["position"] if response_ids is not None else batch["index"]
            return reference_table["kl" if response_ids is not None else split][where.cpu()].to(device)
        with torch.no_grad(), adapters_off(reference_model):
            return sequence_logps(reference_model, batch, response_ids, response_mask)

    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    held_out = held_out_eval(args, tokenizer, device, dtype, annotator, args.annotator)

    @torch.no_grad()
    def evaluate(step: int, tracker: Tracker) -> dict:
        """eval/rewards/* (mean beta * r) of held-out desirable and undesirable responses; the held-out samples'
        eval/* (common/evaluation.py; eval/kl where the reference model is kept)."""
        means = Means()
        for batch in eval_batches:
            desirable = batch["generation1_reward"] == 1.0
            _, diagnostics = kto_loss(
                sequence_logps(policy, batch), reference_logps(batch, "eval"), 0.0, desirable, args
            )
            for name in ("rewards/desirable", "rewards/undesirable"):
                means.add(f"eval/{name}", *diagnostics[name])
        metrics = means.result()
        if {"eval/rewards/desirable", "eval/rewards/undesirable"} <= metrics.keys():
            metrics["eval/rewards/margins"] = metrics["eval/rewards/desirable"] - metrics["eval/rewards/undesirable"]
        if held_out is not None:
            metrics |= held_out(step, policy, reference_model, tracker)
        return metrics

    optimizer = torch.optim.AdamW(
        trainable_parameters(policy), args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, policy, optimizer, scheduler)
        data.load_state_dict(data_state)
    derived = {"global_batch_size": global_batch_size, "world_size": world_size, "learning_rate": args.learning_rate}
    tracker = Tracker(args, run_id, derived, resume_step=start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate(0, tracker))

    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    policy.train()
    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches for one optimizer step, and which examples are desirable.
        # --online: sample a response to each prompt, score it with the annotator (a failed score drops the sample,
        # and more prompts are sampled: common/online.py), then label by the threshold over the step (departure 4)
        if args.online:
            for prompts in sampler.rounds():
                samples = sampler.sample(policy, prompts, num_samples=1)
                scores = annotator.score([p["raw_prompt"] for p in prompts], [s[0]["response"] for s in samples])
                groups = [
                    [online.example(p, s, [score], score is not None)] for p, s, score in zip(prompts, samples, scores)
                ]
                sampler.add(groups, failed=scores.count(None))
            rows = sampler.step_rows()
            rows = reweighter(rows) if reweighter is not None else rows
            batches = [
                to_device(b, device) for b in micro_batches(rows, args.per_device_batch_size, tokenizer.pad_token_id)
            ]
            threshold = label_threshold(
                torch.cat([b["generation1_reward"][b["trainable"]] for b in batches]), args.label_threshold
            )
            for b in batches:
                b["desirable"] = b["generation1_reward"] >= threshold
        else:
            batches = [to_device(b, device) for b in factory.next_step()]
            for b in batches:
                b["desirable"] = b["generation1_reward"] == 1.0
        batch_seconds = time.perf_counter() - step_start
        num_examples = max(all_reduce(sum(b["trainable"].sum() for b in batches)).item(), 1)  # trainable, global

        # 2. kl, then z_ref: the mismatched pairs of the whole global step, without gradient (the trainable examples')
        kl_start = time.perf_counter()
        with torch.no_grad():
            kl_sum = 0.0
            for batch, (response_ids, response_mask) in zip(
                batches, mismatched_responses(batches, tokenizer.pad_token_id)
            ):
                kl_policy_logps = sequence_logps(policy, batch, response_ids, response_mask)
                kl_reference_logps = reference_logps(batch, "train", response_ids, response_mask)
                kl_sum += ((kl_policy_logps - kl_reference_logps) * batch["trainable"]).sum()
            kl = all_reduce(kl_sum).item() / num_examples
            z_ref = max(kl, 0.0)
        kl_seconds = time.perf_counter() - kl_start

        means, step_loss = Means(), 0.0
        for i, batch in enumerate(batches):
            sync_gradients(policy, i == len(batches) - 1)  # reduce gradients once per step
            # 3. forward: log-probs of each example's response, (B,)
            weights = batch["generation1_weight"] * batch["trainable"]
            if sees_policy:  # factors from this forward (WPO, importance weights), constants to the loss
                policy_logps, seen = sequence_logps(policy, batch, with_stats=True)
                weights = reweighter.reweigh(batch, seen, weights)
            else:
                policy_logps = sequence_logps(policy, batch)

            # 4. loss: weighted losses summed over this micro-batch, divided by the global count of trainable
            # examples; the micro-batches add up to this process's share of the global mean, and FSDP averages
            # gradients over processes, so * world_size makes their sum the global mean
            losses, diagnostics = kto_loss(policy_logps, reference_logps(batch), z_ref, batch["desirable"], args)
            loss = (weights * losses).sum() / num_examples * world_size
            loss.backward()
            step_loss += loss.detach()
            means.add("train/loss", weights * losses, batch["trainable"])
            for name, (values, mask) in diagnostics.items():  # each over the trainable examples it is about
                means.add(name, values, batch["trainable"] if mask is None else mask & batch["trainable"])
        # 5. step, unless the loss or a gradient is not finite (importance weights: every factor over the step's mean
        # factor, all micro-batches and processes)
        normaliser = self_normalise(reweighter, policy)
        grad_norm = clip_grad_norm(policy, args.max_grad_norm)
        if finite(f"step {step + 1}", step_loss, grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 6. log: one object per step in metrics.jsonl
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - step_start
            metrics |= means.result()
            if "train/loss" in metrics:  # importance weights: the loss the self-normalised factors give
                metrics["train/loss"] /= normaliser
            if {"rewards/desirable", "rewards/undesirable"} <= metrics.keys():
                metrics["rewards/margins"] = metrics["rewards/desirable"] - metrics["rewards/undesirable"]
            metrics |= {
                "kl": kl,  # the estimate before clamping: z_ref = max(0, kl)
                "z_ref": z_ref,
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": all_reduce(training_tokens(batches)).item() / elapsed,
                "train/examples_per_s": num_examples / elapsed,
                "train/kl_seconds": kl_seconds,  # what the mismatched pairs cost this step
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
            if args.online:  # seconds of the step: sampling, then the annotator (with the rest of phase 1), then update
                metrics |= online.metrics(sum_over_processes(sampler.stats)) | {"online/threshold": threshold}
                seconds = {"sampling": sampler.stats["sampling_seconds"], "update": elapsed - batch_seconds}
                seconds["scoring"] = batch_seconds - seconds["sampling"]
                metrics |= {f"time/{k}": v / world_size for k, v in sum_over_processes(seconds).items()}
                tracker.log_table(step + 1, "online_samples", online.sample_table(rows))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            metrics |= evaluate(step + 1, tracker)
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, policy, optimizer, scheduler, data.state_dict(), run_id)

    save_pretrained(policy, tokenizer, args.output_dir, args.lora.merge)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
