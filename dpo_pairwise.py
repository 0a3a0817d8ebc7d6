"""Direct preference optimisation from pairs (setup 6; setup 7 with --online).

For each pair, with y+ the preferred response (the generation with the higher reward) and y- the other:

    pi_logratios  = log pi(y+|x)  - log pi(y-|x)
    ref_logratios = log ref(y+|x) - log ref(y-|x)
    logits        = pi_logratios - ref_logratios
    sigmoid (DPO, Rafailov et al. 2023, eq. 7; conservative with label_smoothing = eps, Mitchell 2023):
        losses = -log sigmoid(beta * logits) * (1 - eps) - log sigmoid(-beta * logits) * eps
    ipo (Azar et al. 2023, eq. 17; log-probs averaged over each response's tokens, as its authors advise):
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = sum_pairs weights * losses / num_pairs        (num_pairs: pairs in the global batch)

https://arxiv.org/abs/2305.18290  https://arxiv.org/abs/2310.12036  https://ericmitchell.ai/cdpo.pdf

Offline, the pairs come from the dataset. --online: each step samples two responses per dataset prompt
from the policy being trained and the annotator (--annotator) says which is better. Each prompt runs once
for both of its responses (common.logps.shared_prompt_logps): the same log-probs as two separate forwards.

    python sft.py --output_dir runs/sft && python dpo_pairwise.py --model_name_or_path runs/sft
    python dpo_pairwise.py --model_name_or_path runs/sft --online
    torchrun --nproc_per_node 8 dpo_pairwise.py --model_name_or_path runs/sft-hh --dataset hh --online \\
        --annotator reward_model:runs/rm-hh --generation.max_new_tokens 256 --learning_rate 5e-7

Departures from the paper:
1. The reference is the initial policy. Offline, its log-probs are computed once before training
   (--precompute_ref_logps) and the reference model is dropped, so training holds one model.
2. A pair's weight is the mean of its two generations' weights (a dataset column, times --reweighter's factor).
3. Online, pairs the annotator calls a tie, or fails on, are dropped (`label_pair`), and more prompts are
   sampled, so every step trains on a full batch of labelled pairs.
"""

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import get_cosine_schedule_with_warmup

from common import toy
from common.annotators import JudgeArgs, make_annotator
from common.batch import (
    BatchFactory,
    OnlineBatchFactory,
    interleave_responses,
    shard_batches,
    to_device,
    tokenize_records,
)
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
from common.evaluation import held_out_eval
from common.flags import check_shared_args, require
from common.generation import GenerationArgs
from common.logps import shared_prompt_logps
from common.model import add_reference_logps, load_causal_lm, load_tokenizer
from common.reweight import make_reweighter, self_normalise


@dataclass
class Args:
    # experiment
    exp_name: str = "dpo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order, sampling and new weights"""
    output_dir: str = "runs/dpo"
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
    """peak learning rate of AdamW (default: 1e-5 offline, 2e-4 with --online, where the pairs move with the policy)"""
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

    # DPO
    beta: float = 0.1
    """strength of the KL penalty towards the reference (DPO's beta; IPO's tau)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO on per-token averaged log-probs"""
    label_smoothing: float = 0.0
    """conservative DPO: probability that a preference label is flipped (sigmoid loss only)"""
    reference_free: bool = False
    """drop the reference: ref_logratios = 0"""
    precompute_ref_logps: bool = True
    """offline: score every pair with the reference once before training instead of keeping a reference model"""

    # online
    online: bool = False
    """sample pairs from the policy and label them with --annotator, instead of the dataset's pairs"""
    annotator: str = "toy"
    """toy, reward_model:PATH, judge:PATH, http:URL, or python:MODULE:FUNCTION (common/annotators.py)"""
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


def dpo_loss(logits, beta, loss_type, label_smoothing):
    """Per-pair losses (B,), unweighted, from logits = pi_logratios - ref_logratios (B,)."""
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def pair_logps(model, batch, with_stats=False):
    """log pi(y|x) of both generations of every pair, (B, 2): summed over response tokens (IPO divides by
    `pair_lengths`), each prompt run once for both responses; and, with_stats, the per-token view that a
    reweighter of the policy reads (common/reweight.py), else None."""
    response_ids, response_mask = interleave_responses(batch)  # (2B, Tr): a pair's rows adjacent
    inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], response_ids, response_mask
    if not with_stats:
        return shared_prompt_logps(model, *inputs).sum(-1).view(-1, 2), None
    token_logps, seen = shared_prompt_logps(model, *inputs, with_stats=True)
    return token_logps.sum(-1).view(-1, 2), seen


def pair_lengths(batch):
    """Response tokens of both generations of every pair, (B, 2)."""
    return torch.stack([batch["generation1_response_mask"].sum(-1), batch["generation2_response_mask"].sum(-1)], 1)


def chosen_rejected(logps, batch):
    """(B, 2) values of (generation1, generation2) -> (chosen, rejected), each (B,): the chosen generation is the one
    with the higher reward (generation1 in offline data, either one online)."""
    generation2_preferred = batch["generation2_reward"] > batch["generation1_reward"]
    return (
        torch.where(generation2_preferred, logps[:, 1], logps[:, 0]),
        torch.where(generation2_preferred, logps[:, 0], logps[:, 1]),
    )


def label_pair(preference):
    """Online: the annotator's probability that generation1 is better -> (generation1_reward, generation2_reward), or
    None to drop the pair (departure 3): a failed verdict (None) or a tie (0.5) says nothing about which is better."""
    if preference is None or preference == 0.5:
        return None
    return float(preference > 0.5), float(preference < 0.5)


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags all scripts share."""
    check_shared_args(args)
    require(args.beta > 0, "beta", args.beta, "must be above 0")
    require(0 <= args.label_smoothing <= 0.5, "label_smoothing", args.label_smoothing, "must be in [0, 0.5]")
    if args.loss_type == "ipo":
        require(args.label_smoothing == 0, "label_smoothing", args.label_smoothing, "applies to the sigmoid loss only")
    if args.reweighter == "confidence" and not args.online:
        fail("--reweighter confidence weighs pairs by the annotator's probability, which only --online pairs have")


def main(args: Args):
    # offline DPO over-optimises a fixed dataset at rates that online DPO takes in its stride
    if args.learning_rate is None:
        args.learning_rate = 2e-4 if args.online else 1e-5
    check_args(args)
    _, world_size, device = init_distributed(args.seed)
    dtype = compute_dtype(args.dtype, device)
    run_id = claim_output_dir(args.output_dir, args.resume, args.overwrite)  # before any work, so it fails fast
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    print0(
        f"{world_size} process(es) on {device.type}, computing in {dtype}; global batch {global_batch_size} pairs = "
        f"{args.per_device_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {world_size} "
        f"processes; learning rate {args.learning_rate}"
    )

    tokenizer = load_tokenizer(args.model_name_or_path)
    reweighter = make_reweighter(args.reweighter)
    sees_policy = reweighter is not None and reweighter.sees_policy
    # data first: bad data fails before a model loads; online, the dataset's prompts only
    records = load_records(args.dataset, args.dataset_split, "prompt" if args.online else "pairwise")
    annotator = make_annotator(args.annotator, device, args.judge, dtype) if args.online else None
    policy = load_causal_lm(args.model_name_or_path, tokenizer, device, args.gradient_checkpointing)
    policy = prepare_model(policy, device, dtype)
    eval_rows = []
    if args.online:  # the pairs are sampled and annotated every step
        factory = OnlineBatchFactory(
            records,
            tokenizer,
            policy,
            annotator,
            num_generations=2,
            label=label_pair,
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
        factory = BatchFactory(
            tokenize_records(records, tokenizer, args.max_length, args.max_prompt_length),
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
        if eval_records:
            eval_rows = tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length)
            # equal shares: FSDP forwards are collectives
            eval_rows = eval_rows[: len(eval_rows) // world_size * world_size]
        if reweighter is not None and reweighter.behaviour_path:  # importance: rho's log-probs, once
            reweighter.prepare(factory.rows_until(args.max_steps), tokenizer, device, dtype, args.per_device_batch_size)

    # where the reference log-probs of a batch's pairs, (B, 2), come from: chosen here, once. The reference is the
    # initial policy, loaded again (so --resume gets it too) and frozen.
    if args.reference_free:
        reference = None

        def reference_pair_logps(batch):
            return torch.zeros(len(batch["prompt"]), 2, device=device)
    elif args.precompute_ref_logps and not args.online:  # once, for every pair this run scores (training and held-out)
        start, used = time.perf_counter(), factory.rows_until(args.max_steps) + eval_rows
        reference = load_causal_lm(args.model_name_or_path, tokenizer, device)
        reference = prepare_model(reference, device, dtype, trainable=False).eval()
        add_reference_logps(reference, used, tokenizer.pad_token_id, args.per_device_batch_size)
        print0(f"reference log-probs of {len(used)} pairs in {time.perf_counter() - start:.1f} s")
        reference = None  # training holds one model

        def reference_pair_logps(batch):
            return torch.stack([batch["generation1_reference_logps"], batch["generation2_reference_logps"]], 1)
    else:  # online pairs are new every step: the reference model runs on them
        reference = load_causal_lm(args.model_name_or_path, tokenizer, device)
        reference = prepare_model(reference, device, dtype, trainable=False).eval()

        def reference_pair_logps(batch):
            with torch.no_grad():
                return pair_logps(reference, batch)[0]

    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    held_out = held_out_eval(args, tokenizer, device, annotator)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        """eval/loss (unweighted) and eval/rewards/* over held-out pairs; the held-out samples' eval/*
        (common/evaluation.py; eval/kl where the reference model is kept)."""
        metrics, sums = {}, defaultdict(float)
        for batch in eval_batches:
            policy_logps, reference_logps = pair_logps(policy, batch)[0], reference_pair_logps(batch)
            if args.loss_type == "ipo":
                policy_logps = policy_logps / pair_lengths(batch)
                reference_logps = reference_logps / pair_lengths(batch)
            policy_chosen_logps, policy_rejected_logps = chosen_rejected(policy_logps, batch)
            reference_chosen_logps, reference_rejected_logps = chosen_rejected(reference_logps, batch)
            pi_logratios = policy_chosen_logps - policy_rejected_logps
            ref_logratios = reference_chosen_logps - reference_rejected_logps
            logits = pi_logratios - ref_logratios
            losses = dpo_loss(logits, args.beta, args.loss_type, args.label_smoothing)
            chosen_rewards = args.beta * (policy_chosen_logps - reference_chosen_logps)
            rejected_rewards = args.beta * (policy_rejected_logps - reference_rejected_logps)
            sums["eval/loss"] += losses.sum()
            sums["eval/rewards/accuracies"] += (chosen_rewards > rejected_rewards).float().sum()
            sums["eval/rewards/margins"] += (chosen_rewards - rejected_rewards).sum()
        if eval_rows:
            metrics |= {name: value / len(eval_rows) for name, value in sum_over_processes(sums).items()}
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
        # 1. get batch: this process's micro-batches of pairs for one optimizer step (sampled + annotated when --online)
        batches = [to_device(b, device) for b in factory.next_step()]
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        sums = defaultdict(float)  # per-step sums of the logged metrics, by name
        for i, batch in enumerate(batches):
            sync_gradients(policy, i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: log-probs of both responses of each pair, (B, 2), then oriented into chosen and rejected
            policy_logps, seen = pair_logps(policy, batch, with_stats=sees_policy)
            reference_logps = reference_pair_logps(batch)
            if args.loss_type == "ipo":  # IPO compares per-token averages, so beta does not depend on response length
                policy_logps = policy_logps / pair_lengths(batch)
                reference_logps = reference_logps / pair_lengths(batch)
            policy_chosen_logps, policy_rejected_logps = chosen_rejected(policy_logps, batch)
            reference_chosen_logps, reference_rejected_logps = chosen_rejected(reference_logps, batch)
            weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2  # (B,), departure 2
            if sees_policy:  # factors from this forward (WPO, importance weights), constants to the loss
                weights = reweighter.reweigh(batch, seen, weights)

            # 3. loss: weighted losses summed over this micro-batch, divided by the global pair count; the
            # micro-batches add up to this process's share of the global mean, and FSDP averages gradients
            # over processes, so * world_size makes their sum the global mean
            pi_logratios = policy_chosen_logps - policy_rejected_logps
            ref_logratios = reference_chosen_logps - reference_rejected_logps
            logits = pi_logratios - ref_logratios
            losses = dpo_loss(logits, args.beta, args.loss_type, args.label_smoothing)
            loss = (weights * losses).sum() / num_pairs * world_size
            loss.backward()

            with torch.no_grad():  # diagnostics: implicit rewards r = beta * (log pi - log ref) of each response
                chosen_rewards = args.beta * (policy_chosen_logps - reference_chosen_logps)
                rejected_rewards = args.beta * (policy_rejected_logps - reference_rejected_logps)
                sums["train/loss"] += (weights * losses).sum()
                sums["rewards/chosen"] += chosen_rewards.sum()
                sums["rewards/rejected"] += rejected_rewards.sum()
                sums["rewards/margins"] += (chosen_rewards - rejected_rewards).sum()
                sums["rewards/accuracies"] += (chosen_rewards > rejected_rewards).float().sum()
                sums["logps/chosen"] += policy_chosen_logps.sum()
                sums["logps/rejected"] += policy_rejected_logps.sum()
        # 4. step, unless the loss or a gradient is not finite (importance weights: every factor over the step's mean
        # factor, all micro-batches and processes)
        sums["train/loss"] /= self_normalise(reweighter, policy)
        grad_norm = clip_grad_norm(policy, args.max_grad_norm)
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
            if args.online:
                metrics |= factory.metrics(sum_over_processes(factory.stats))
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
