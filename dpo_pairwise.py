"""Direct preference optimisation from pairs (setup 6; setup 7 with --online).

For each pair, with y+ the preferred response (the generation with the higher reward) and y- the other:

    pi_logratios  = log pi(y+|x)  - log pi(y-|x)
    ref_logratios = log ref(y+|x) - log ref(y-|x)
    logits        = pi_logratios - ref_logratios
    sigmoid (DPO, Rafailov et al. 2023, eq. 7; conservative with label_smoothing = eps, Mitchell 2023):
        losses = -log sigmoid(beta * logits) * (1 - eps) - log sigmoid(-beta * logits) * eps
    ipo (Azar et al. 2023, eq. 17; log-probs averaged over each response's tokens, as its authors advise):
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = sum_pairs weight * losses / num_pairs        (num_pairs: pairs in the global batch)

https://arxiv.org/abs/2305.18290  https://arxiv.org/abs/2310.12036  https://ericmitchell.ai/cdpo.pdf

Offline, the pairs come from the dataset. --online: each step samples two responses per dataset prompt
from the policy being trained and the annotator (--annotator) says which is better. Each prompt runs once
for both of its responses (common.model.shared_prompt_logps): the same log-probs as two separate forwards.

    python sft.py --output_dir runs/sft && python dpo_pairwise.py --model_name_or_path runs/sft
    python dpo_pairwise.py --model_name_or_path runs/sft --online
    torchrun --nproc_per_node 8 dpo_pairwise.py --model_name_or_path runs/sft-hh --dataset hh --online \
        --annotator reward_model:runs/rm-hh --max_new_tokens 256 --learning_rate 5e-7 --per_device_batch_size 4

Departures from the paper:
1. The reference is the initial policy. Offline, its log-probs are computed once before training
   (--precompute_ref_logps) and the reference model is dropped, so training holds one model.
2. A pair's weight is the mean of its two generations' weights (a dataset column, times --reweighter's factor).
3. Online, pairs the annotator calls a tie, or fails on, are dropped (and counted), and more prompts are
   sampled, so every step trains on a full batch of labelled pairs.
"""

import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common import toy
from common.annotators import make_annotator
from common.batch import BatchFactory, OnlineBatchFactory, interleave_responses, shard_batches, to_device, tokenize_records
from common.data import load_eval_records, load_records
from common.distributed import (Tracker, all_reduce, cleanup, fail, init_distributed, is_main, load_checkpoint, print0,
                                save_checkpoint, save_pretrained, shard_model, sum_counters)
from common.model import add_reference_logps, load_causal_lm, load_tokenizer, shared_prompt_logps
from common.reweight import make_reweighter


@dataclass
class Args:
    # experiment
    exp_name: str = "dpo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order and sampling"""
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
    save_every: int = 0
    """save a checkpoint every this many steps (0: never)"""
    log_every: int = 10
    """log metrics every this many steps"""

    # model and data
    model_name_or_path: str = "toy"
    """hub id or local path of the causal LM to align (usually an SFT model); `toy` is a random tiny Llama"""
    dataset: str = "toy"
    """toy, hh, shp, ultrafeedback, a hub id, or a local .jsonl/.json/.parquet/.csv file"""
    dataset_split: str = "train"
    """split to train on"""
    eval_dataset: str | None = None
    """held-out pairs (default: --dataset's --eval_split; none for a local file)"""
    eval_split: str = "test"
    """split of held-out pairs"""
    max_length: int = 512
    """longest prompt + response in tokens"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each pair counts: none (the data's weights), confidence (online: |2p - 1|, p the annotator's
    probability that generation1 is better), or python:MODULE:FUNCTION (common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""

    # optimization
    max_steps: int = 150
    """optimizer steps"""
    learning_rate: float | None = None
    """peak learning rate of AdamW (default: 1e-5 offline, 2e-4 with --online, where the pairs move with the policy)"""
    per_device_batch_size: int = 32
    """pairs per micro-batch on each process"""
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
    max_new_tokens: int = 16
    """longest sampled response in tokens"""
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens with this much probability"""
    judge_model: str | None = None
    """http judge: the model name the endpoint serves"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """http judge: environment variable that holds the API key (the key itself is never logged or saved)"""
    judge_timeout: float = 30.0
    """http judge: seconds before a request times out (then retried, then counted as failed)"""
    judge_max_concurrency: int = 8
    """http judge: requests in flight at once per process"""
    judge_template: str | None = None
    """judges: the question, a format string with {prompt}, {response1}, {response2} (or a file holding one)"""

    # evaluation
    eval_every: int = 50
    """evaluate every this many steps (and at the start and the end)"""
    num_eval_pairs: int = 512
    """held-out pairs for eval/loss and eval/accuracy"""
    num_eval_prompts: int = 512
    """toy only: held-out prompts sampled for eval/reward"""


def preference_loss(logps1, logps2, reference_logps1, reference_logps2, lengths1, lengths2, reward1, reward2, weights, args):
    """Weighted per-pair losses and implicit rewards for pairs of generations; the rewards say which is preferred.
    logps*: summed log-probs of each generation (B,); lengths*: its number of response tokens (B,)."""
    if args.loss_type == "ipo":  # IPO compares per-token averages, so beta does not depend on response length
        logps1, logps2 = logps1 / lengths1, logps2 / lengths2
        reference_logps1, reference_logps2 = reference_logps1 / lengths1, reference_logps2 / lengths2
    if args.reference_free:
        reference_logps1, reference_logps2 = torch.zeros_like(logps1), torch.zeros_like(logps2)
    # orient each pair: chosen is the generation with the higher reward (generation1 in offline data)
    generation2_preferred = reward2 > reward1
    policy_chosen_logps = torch.where(generation2_preferred, logps2, logps1)
    policy_rejected_logps = torch.where(generation2_preferred, logps1, logps2)
    reference_chosen_logps = torch.where(generation2_preferred, reference_logps2, reference_logps1)
    reference_rejected_logps = torch.where(generation2_preferred, reference_logps1, reference_logps2)

    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if args.loss_type == "sigmoid":
        losses = -F.logsigmoid(args.beta * logits) * (1 - args.label_smoothing) - F.logsigmoid(-args.beta * logits) * args.label_smoothing
    else:
        losses = (logits - 1 / (2 * args.beta)) ** 2
    chosen_rewards = args.beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = args.beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return weights * losses, chosen_rewards, rejected_rewards, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def forward(policy, reference, batch, args):
    """Both generations of every pair in one forward that runs each prompt once, then preference_loss."""
    inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], *interleave_responses(batch)  # (2B, Tr): a pair's rows adjacent
    logps1, logps2 = shared_prompt_logps(policy, *inputs).sum(-1).view(-1, 2).unbind(1)  # (B,), (B,)
    if "generation1_reference_logps" in batch:  # precomputed
        reference_logps1, reference_logps2 = batch["generation1_reference_logps"], batch["generation2_reference_logps"]
    elif reference is not None:
        with torch.no_grad():
            reference_logps1, reference_logps2 = shared_prompt_logps(reference, *inputs).sum(-1).view(-1, 2).unbind(1)
    else:  # --reference_free
        reference_logps1 = reference_logps2 = torch.zeros_like(logps1)
    lengths1, lengths2 = batch["generation1_response_mask"].sum(-1), batch["generation2_response_mask"].sum(-1)
    weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2
    return preference_loss(logps1, logps2, reference_logps1, reference_logps2, lengths1, lengths2,
                           batch["generation1_reward"], batch["generation2_reward"], weights, args)


@torch.no_grad()
def evaluate_pairs(policy, reference, eval_batches, num_pairs, args) -> dict:
    sums = torch.zeros(4)
    for batch in eval_batches:
        losses, chosen_rewards, rejected_rewards, _, _ = forward(policy, reference, batch, args)
        sums += torch.stack([losses.sum(), (chosen_rewards > rejected_rewards).float().sum(),
                             chosen_rewards.sum(), rejected_rewards.sum()]).cpu()
    loss, accuracy, chosen, rejected = (all_reduce(sums) / num_pairs).tolist()
    return {"eval/loss": loss, "eval/rewards/accuracies": accuracy, "eval/rewards/margins": chosen - rejected}


def main(args: Args):
    if args.learning_rate is None:  # offline DPO over-optimises a fixed dataset at rates that online DPO takes in its stride
        args.learning_rate = 2e-4 if args.online else 1e-5
    if args.reweighter == "confidence" and not args.online:
        fail("--reweighter confidence weighs pairs by the annotator's preference probability, which only --online pairs have")
    _, world_size, device = init_distributed(args.seed)
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    print0(f"{world_size} process(es) on {device.type}; global batch {global_batch_size} pairs = {args.per_device_batch_size} "
           f"per device x {args.gradient_accumulation_steps} accumulation x {world_size} processes; learning rate {args.learning_rate}")

    tokenizer = load_tokenizer(args.model_name_or_path)
    reweighter = make_reweighter(args.reweighter)
    policy = shard_model(load_causal_lm(args.model_name_or_path, tokenizer, device, args.gradient_checkpointing), device)
    eval_rows = []
    if args.online:  # prompts only; the pairs are sampled and annotated every step
        if args.annotator == "toy" and args.dataset != "toy":
            fail("--annotator toy scores only the toy task; choose an annotator for this dataset (see --help)")
        template = open(args.judge_template).read() if args.judge_template and os.path.isfile(args.judge_template) else args.judge_template
        annotator = make_annotator(args.annotator, device, judge_model=args.judge_model, judge_api_key_env=args.judge_api_key_env,
                                   judge_timeout=args.judge_timeout, judge_max_concurrency=args.judge_max_concurrency, judge_template=template)
        factory = OnlineBatchFactory(
            load_records(args.dataset, args.dataset_split, "prompt"), tokenizer, policy, annotator, True, args.max_prompt_length,
            args.max_new_tokens, args.temperature, args.top_p, args.per_device_batch_size, args.gradient_accumulation_steps,
            args.seed, sample_reward=toy.true_reward if args.dataset == "toy" else None, group_by_length=args.group_by_length,
            reweighter=reweighter)
    else:
        rows = tokenize_records(load_records(args.dataset, args.dataset_split, "pairwise"), tokenizer, args.max_length, args.max_prompt_length)
        factory = BatchFactory(rows, tokenizer.pad_token_id, args.per_device_batch_size, args.gradient_accumulation_steps, args.seed,
                               args.group_by_length, reweighter)
        eval_records = load_eval_records(args.dataset, args.eval_dataset, args.eval_split, "pairwise", args.num_eval_pairs)
        if eval_records:
            eval_rows = tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length)
            eval_rows = eval_rows[: len(eval_rows) // world_size * world_size]  # equal shares: FSDP forwards are collectives
    # the reference is the initial policy, loaded again (so --resume gets it too) and frozen
    reference = None if args.reference_free else shard_model(load_causal_lm(args.model_name_or_path, tokenizer, device), device, trainable=False).eval()
    if reference is not None and args.precompute_ref_logps and not args.online:
        start, used = time.perf_counter(), factory.rows_until(args.max_steps) + eval_rows  # only the pairs this run will see
        add_reference_logps(reference, used, tokenizer.pad_token_id, args.per_device_batch_size)
        print0(f"reference log-probs of {len(used)} pairs in {time.perf_counter() - start:.1f} s")
        reference = None  # no second model in memory while training
    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    toy_batch = toy.eval_batch(tokenizer, args.num_eval_prompts, device) if args.dataset == "toy" else None

    def evaluate() -> dict:
        metrics = evaluate_pairs(policy, reference, eval_batches, len(eval_rows), args) if eval_rows else {}
        if toy_batch is not None:
            metrics |= toy.evaluate(policy, tokenizer, toy_batch, args.num_eval_prompts, seed=args.seed)
        return metrics

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)  # one kernel for all parameters
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, policy, optimizer, scheduler)
        factory.load_state_dict(data_state)
    tracker = Tracker(args, resume_step=start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate())

    policy.train()
    for step in tqdm(range(start_step, args.max_steps), disable=not is_main(), initial=start_step, total=args.max_steps):
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches of pairs for one optimizer step (sampled + annotated when --online)
        batches = [to_device(b, device) for b in factory.next_step()]
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        sums = torch.zeros(6)
        for i, batch in enumerate(batches):
            policy.set_requires_gradient_sync(i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: both generations of each pair, sharing the prompt's forward
            losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = forward(policy, reference, batch, args)
            # 3. loss: weighted losses summed over this micro-batch, divided by the global pair count; the
            # micro-batches add up to this process's share of the global mean, and FSDP averages gradients
            # over processes, so * world_size makes their sum the global mean
            loss = losses.sum() / num_pairs * world_size
            loss.backward()
            sums += torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                                 (chosen_rewards > rejected_rewards).float().sum(), chosen_logps.sum(), rejected_logps.sum()]).detach().cpu()
        # 4. step
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            loss, chosen, rejected, accuracy, chosen_logps, rejected_logps = (all_reduce(sums) / num_pairs).tolist()
            num_tokens = all_reduce(sum(b[f"{g}_attention_mask"].sum() for b in batches for g in ("generation1", "generation2"))).item()
            elapsed = time.perf_counter() - step_start
            tracker.log(step + 1, {
                "train/loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "rewards/accuracies": accuracy, "logps/chosen": chosen_logps, "logps/rejected": rejected_logps,
                "train/grad_norm": grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm,
                "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": num_tokens / elapsed, "train/pairs_per_s": num_pairs / elapsed,
            })
            if reweighter is not None:
                tracker.log(step + 1, reweighter.metrics(sum_counters(reweighter.stats)))
            if args.online:
                tracker.log(step + 1, factory.metrics() | {f"annotator/{k}": v for k, v in sum_counters(annotator.stats).items()})
                tracker.log_samples(step + 1, factory.samples)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            metrics = evaluate()
            tracker.log(step + 1, metrics)
            print0(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "per_s" not in k))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, policy, optimizer, scheduler, factory.state_dict())

    save_pretrained(policy, tokenizer, args.output_dir)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
