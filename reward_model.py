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
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from transformers import get_cosine_schedule_with_warmup

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
from common.flags import check_dataset_args, check_shared_args, fail, require
from common.model import LoraArgs, add_lora, load_reward_model, load_tokenizer
from common.reweight import check_reweighter, make_reweighter
from common.tracking import Means, Tracker


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
    """longest prompt + response in tokens of the dataset's examples"""
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each pair counts: none (the data's weights) or python:MODULE:FUNCTION (a function of the rows:
    common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """what forwards compute in: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; weights and optimizer states stay
    fp32 (bf16 is mixed precision)"""
    lora: LoraArgs = field(default_factory=LoraArgs)

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
    """held-out examples (pairs, in the pairwise scripts) that each evaluation scores as in training (eval/loss,
    eval/rewards/*); offline runs"""


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


def bradley_terry_loss(rewards, batch):
    """The loss of every pair (B,), unweighted, and its diagnostics ({name: (B,)}, no gradient), from r(x, y) of both
    generations (B, 2): the loop's and the evaluation's, written once."""
    chosen_rewards, rejected_rewards = chosen_rejected(rewards, batch)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    with torch.no_grad():
        return losses, {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "rewards/mean": (chosen_rewards + rejected_rewards) / 2,
        }


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags the scripts share."""
    check_shared_args(args)
    check_dataset_args(args)
    check_reweighter(args.reweighter, ("none", "python"), "reward_model.py")
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
    records = load_records(args.dataset, args.dataset_split, "pairwise")  # data first: bad data fails before a model
    factory, eval_rows = offline_data(args, records, "pairwise", tokenizer, reweighter)
    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    model = load_reward_model(
        args.model_name_or_path,
        tokenizer,
        device,
        from_causal_lm=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    model = add_lora(model, args.lora, args.model_name_or_path, modules_to_save=["score"])  # the head trains in full
    model = prepare_model(model, device, dtype)

    @torch.no_grad()
    def evaluate(batches) -> dict:
        """Loss (unweighted), accuracy, margin and mean reward over held-out pairs (every process's share)."""
        means = Means()
        for batch in batches:
            losses, diagnostics = bradley_terry_loss(pair_rewards(model, batch), batch)
            means.add("eval/loss", losses)
            for name in ("rewards/accuracies", "rewards/margins", "rewards/mean"):
                means.add(f"eval/{name}", diagnostics[name])
        return means.result()

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
        tracker.log(0, evaluate(eval_batches))

    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    model.train()
    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches of pairs for one optimizer step
        batches = [to_device(b, device) for b in factory.next_step()]
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        means, step_loss = Means(), 0.0
        for i, batch in enumerate(batches):
            sync_gradients(model, i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: r(x, y) of both responses of each pair, (B, 2)
            rewards = pair_rewards(model, batch)
            weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2  # (B,), departure 2

            # 3. loss: weighted losses over this micro-batch / global pair count; FSDP averages gradients
            # over processes, so * world_size makes the sum over processes the global mean
            losses, diagnostics = bradley_terry_loss(rewards, batch)
            loss = (weights * losses).sum() / num_pairs * world_size
            loss.backward()
            step_loss += loss.detach()
            means.add("train/loss", weights * losses)
            for name, values in diagnostics.items():  # each a mean over the step's pairs
                means.add(name, values)
        # 4. step, unless the loss or a gradient is not finite
        grad_norm = clip_grad_norm(model, args.max_grad_norm)
        if finite(f"step {step + 1}", step_loss, grad_norm):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log: one object per step in metrics.jsonl; each per-pair sum over all processes / the global pair count
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - step_start
            metrics |= means.result()
            metrics |= {
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": all_reduce(training_tokens(batches)).item() / elapsed,
                "train/pairs_per_s": num_pairs / elapsed,
            }
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            metrics |= evaluate(eval_batches)
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, factory.state_dict(), run_id)

    if args.center_rewards:  # departure 1
        center_rows = factory.rows[: args.num_center_pairs]
        center_batches = shard_batches(center_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
        model.config.reward_mean = evaluate(center_batches)["eval/rewards/mean"]
        print0(f"centred: reward_mean {model.config.reward_mean:.4f} recorded in the config")
    save_pretrained(model, tokenizer, args.output_dir, args.lora.merge)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
