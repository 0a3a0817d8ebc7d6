"""Direct preference optimisation from pairs (setup 6; setup 7 with --online).

For each pair, with y+ the preferred response (the generation with the higher reward) and y- the other:

    pi_logratios  = log pi(y+|x)  - log pi(y-|x)
    ref_logratios = log ref(y+|x) - log ref(y-|x)
    logits        = pi_logratios - ref_logratios
    sigmoid (DPO, Rafailov et al. 2023, eq. 7; conservative with label_smoothing = eps, Mitchell 2023):
        losses = -log sigmoid(beta * logits) * (1 - eps) - log sigmoid(-beta * logits) * eps
    ipo (Azar et al. 2023, eq. 17; log-probs averaged over each response's tokens, as its authors advise):
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = sum_pairs weights * losses / num_pairs        (num_pairs: trainable pairs in the global batch)

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
3. Online, pairs the annotator calls a tie, or fails on, are dropped (`label_pairs`), and more prompts are sampled
   until the step is full; if it cannot be filled (common/online.py), the rest of it is dropped pairs that no loss
   or diagnostic counts (`trainable`).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import get_cosine_schedule_with_warmup

from common import online
from common.annotators import JudgeArgs, make_annotator
from common.batch import interleave_responses, micro_batches, offline_data, shard_batches, to_device, training_tokens
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
from common.flags import check_dataset_args, check_eval_args, check_online_args, check_shared_args, fail, require
from common.generation import GenerationArgs
from common.logps import precompute_logps, shared_prompt_logps
from common.model import LoraArgs, adapters_off, add_lora, load_causal_lm, load_tokenizer
from common.reweight import check_reweighter, make_reweighter, self_normalise
from common.tracking import Means, Tracker


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
    """longest prompt + response in tokens of the dataset's examples"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each pair counts: none (the data's weights), confidence (--online: |2p - 1|, p the annotator's
    probability that generation1 is better), policy (WPO: the responses' probability under the policy),
    importance:PATH (offline: pi / rho against the model PATH that wrote the data), or python:MODULE:FUNCTION
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
    """held-out examples (pairs, in the pairwise scripts) that each evaluation scores as in training (eval/loss,
    eval/rewards/*); offline runs"""
    eval: EvalArgs = field(default_factory=EvalArgs)


def pair_logps(model, batch, with_stats=False):
    """log pi(y|x) of both generations of every pair, (B, 2): summed over response tokens, each prompt run once for
    both responses; and, with_stats, the per-token view that a reweighter of the policy reads (common/reweight.py),
    else None."""
    response_ids, response_mask = interleave_responses(batch)  # (2B, Tr): a pair's rows adjacent
    inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], response_ids, response_mask
    if not with_stats:
        return shared_prompt_logps(model, *inputs).sum(-1).view(-1, 2), None
    token_logps, seen = shared_prompt_logps(model, *inputs, with_stats=True)
    return token_logps.sum(-1).view(-1, 2), seen


def chosen_rejected(values, batch):
    """(B, 2) values of (generation1, generation2) -> (chosen, rejected), each (B,): the chosen generation is the one
    with the higher reward (generation1 in offline data, either one online)."""
    generation2_preferred = batch["generation2_reward"] > batch["generation1_reward"]
    return (
        torch.where(generation2_preferred, values[:, 1], values[:, 0]),
        torch.where(generation2_preferred, values[:, 0], values[:, 1]),
    )


def dpo_loss(policy_logps, reference_logps, batch, args):
    """The loss of every pair (B,), unweighted, and its diagnostics ({name: (B,)}, no gradient), from the log-probs of
    both generations (B, 2) under the policy and the reference: the loop's and the evaluation's, written once."""
    if args.loss_type == "ipo":  # IPO compares per-token averages, so beta does not depend on response length
        lengths = torch.stack(
            [batch[f"{g}_response_attention_mask"].sum(-1) for g in ("generation1", "generation2")], 1
        )
        policy_logps, reference_logps = policy_logps / lengths, reference_logps / lengths
    policy_chosen_logps, policy_rejected_logps = chosen_rejected(policy_logps, batch)
    reference_chosen_logps, reference_rejected_logps = chosen_rejected(reference_logps, batch)
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if args.loss_type == "ipo":
        losses = (logits - 1 / (2 * args.beta)) ** 2
    else:
        eps = args.label_smoothing
        losses = -F.logsigmoid(args.beta * logits) * (1 - eps) - F.logsigmoid(-args.beta * logits) * eps
    with torch.no_grad():  # implicit rewards r = beta * (log pi - log ref) of each response
        chosen_rewards = args.beta * (policy_chosen_logps - reference_chosen_logps)
        rejected_rewards = args.beta * (policy_rejected_logps - reference_rejected_logps)
        return losses, {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_chosen_logps,
            "logps/rejected": policy_rejected_logps,
        }


def label_pairs(prompts, samples, preferences) -> list[list[dict]]:
    """Online: each prompt's two samples and the annotator's probability that the first is better -> the prompt's
    group (one pair): generation1_reward 1.0 where the annotator prefers it, else 0.0, generation2's the other way;
    `preference` kept on the row. A failed verdict (None) or a tie (0.5) says nothing about which is better: the pair
    is not trainable (departure 3)."""
    groups = []
    for prompt, pair, preference in zip(prompts, samples, preferences):
        known = preference is not None and preference != 0.5
        rewards = (float(preference > 0.5), float(preference < 0.5)) if known else (math.nan, math.nan)
        groups.append([online.example(prompt, pair, rewards, trainable=known) | {"preference": preference}])
    return groups


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags the scripts share."""
    check_shared_args(args)
    check_dataset_args(args)
    check_eval_args(args.eval, args.generation.max_new_tokens, args.dataset)
    if args.online:
        check_online_args(args)
    check_reweighter(args.reweighter, ("none", "confidence", "policy", "importance", "python"), "dpo_pairwise.py")
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
    policy = prepare_model(add_lora(policy, args.lora, args.model_name_or_path), device, dtype)
    eval_rows = []
    if args.online:  # the pairs are sampled and annotated every step
        size = args.per_device_batch_size * args.gradient_accumulation_steps
        data = sampler = online.OnlineSampler.from_args(args, records, tokenizer, annotator, device, size)
    else:
        factory, eval_rows = offline_data(args, records, "pairwise", tokenizer, reweighter)
        data = factory
        if reweighter is not None and reweighter.behaviour_path:  # importance: rho's log-probs, once
            used = factory.indices_until(args.max_steps)
            reweighter.prepare(factory.rows, used, tokenizer, device, dtype, args.per_device_batch_size)

    # The reference is the initial policy: with LoRA the policy with its adapters off (common.model.adapters_off), else
    # loaded again (so --resume gets it too) and frozen. A model that scores each batch (online, and offline with
    # --no-precompute_ref_logps), or offline a table of its log-probs of every pair the run scores, computed once
    # before training (departure 1); neither with --reference_free. The table: {"train": (dataset rows, 2), "eval":
    # (held-out rows, 2)}, read by a batch's `index`.
    reference_model, reference_table = None, None
    if not args.reference_free and args.lora.r:
        reference_model = policy
    elif not args.reference_free:
        reference_model = load_causal_lm(args.model_name_or_path, tokenizer, device)
        reference_model = prepare_model(reference_model, device, dtype, trainable=False).eval()
    if not args.reference_free and args.precompute_ref_logps and not args.online:
        start, used = time.perf_counter(), factory.indices_until(args.max_steps)
        rows = [factory.rows[i] for i in used] + eval_rows
        with adapters_off(reference_model):
            logps = precompute_logps(reference_model, rows, tokenizer.pad_token_id, args.per_device_batch_size)
        reference_table = {"train": torch.full((len(factory.rows), 2), math.nan), "eval": logps[len(used) :]}
        reference_table["train"][used] = logps[: len(used)]
        print0(f"reference log-probs of {len(rows)} pairs in {time.perf_counter() - start:.1f} s (no eval/kl)")
        reference_model = None  # training holds one model (with LoRA: the policy only, as ever)

    def reference_pair_logps(batch, split="train"):
        """log ref(y|x) of both generations of every pair of the batch, (B, 2)."""
        if reference_table is not None:
            return reference_table[split][batch["index"].cpu()].to(device)
        if reference_model is not None:
            with torch.no_grad(), adapters_off(reference_model):
                return pair_logps(reference_model, batch)[0]
        return torch.zeros(len(batch["prompt"]), 2, device=device)  # --reference_free: ref_logratios = 0

    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    held_out = held_out_eval(args, tokenizer, device, dtype, annotator, args.annotator)

    @torch.no_grad()
    def evaluate(step: int, tracker: Tracker) -> dict:
        """eval/loss (unweighted) and eval/rewards/* over held-out pairs; the held-out samples' eval/*
        (common/evaluation.py; eval/kl where the reference model is kept)."""
        means = Means()
        for batch in eval_batches:
            losses, diagnostics = dpo_loss(
                pair_logps(policy, batch)[0], reference_pair_logps(batch, "eval"), batch, args
            )
            means.add("eval/loss", losses)
            for name in ("rewards/accuracies", "rewards/margins"):
                means.add(f"eval/{name}", diagnostics[name])
        metrics = means.result()
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
        # 1. get batch: this process's micro-batches of pairs for one optimizer step. --online: sample two responses
        # to each prompt, ask the annotator which is better, keep the pairs it prefers one of (label_pairs), and
        # sample more prompts while too few were kept (common/online.py)
        if args.online:
            for prompts in sampler.rounds():
                samples = sampler.sample(policy, prompts, num_samples=2)  # per prompt: its two responses
                responses1, responses2 = ([pair[i]["response"] for pair in samples] for i in (0, 1))
                preferences = annotator.prefer([p["raw_prompt"] for p in prompts], responses1, responses2)
                sampler.add(label_pairs(prompts, samples, preferences), failed=preferences.count(None))
            rows = sampler.step_rows()
            rows = reweighter(rows) if reweighter is not None else rows
            batches = micro_batches(rows, args.per_device_batch_size, tokenizer.pad_token_id)
        else:
            batches = factory.next_step()
        batches = [to_device(b, device) for b in batches]
        batch_seconds = time.perf_counter() - step_start
        num_pairs = max(all_reduce(sum(b["trainable"].sum() for b in batches)).item(), 1)  # trainable pairs, global
        means, step_loss = Means(), 0.0
        for i, batch in enumerate(batches):
            sync_gradients(policy, i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: log-probs of both responses of each pair, (B, 2)
            policy_logps, seen = pair_logps(policy, batch, with_stats=sees_policy)
            reference_logps = reference_pair_logps(batch)
            weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2 * batch["trainable"]  # dep. 2
            if sees_policy:  # factors from this forward (WPO, importance weights), constants to the loss
                weights = reweighter.reweigh(batch, seen, weights)

            # 3. loss: weighted losses summed over this micro-batch, divided by the global count of trainable pairs;
            # the micro-batches add up to this process's share of the global mean, and FSDP averages gradients over
            # processes, so * world_size makes their sum the global mean
            losses, diagnostics = dpo_loss(policy_logps, reference_logps, batch, args)
            loss = (weights * losses).sum() / num_pairs * world_size
            loss.backward()
            step_loss += loss.detach()
            means.add("train/loss", weights * losses, batch["trainable"])
            for name, values in diagnostics.items():  # each a mean over the step's trainable pairs
                means.add(name, values, batch["trainable"])
        # 4. step, unless the loss or a gradient is not finite (importance weights: every factor over the step's mean
        # factor, all micro-batches and processes)
        normaliser = self_normalise(reweighter, policy)
        grad_norm = clip_grad_norm(policy, args.max_grad_norm)
        if finite(f"step {step + 1}", step_loss, grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: one object per step in metrics.jsonl
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - step_start
            metrics |= means.result()
            if "train/loss" in metrics:  # importance weights: the loss the self-normalised factors give
                metrics["train/loss"] /= normaliser
            metrics |= {
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": all_reduce(training_tokens(batches)).item() / elapsed,
                "train/pairs_per_s": num_pairs / elapsed,
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
            if args.online:  # seconds of the step: sampling, then the annotator (with the rest of phase 1), then update
                metrics |= online.metrics(sum_over_processes(sampler.stats))
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
