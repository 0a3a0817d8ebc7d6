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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common.batch import BatchFactory, shard_batches, to_device, tokenize_records
from common.data import load_eval_records, load_records
from common.distributed import (Tracker, all_reduce, cleanup, init_distributed, is_main, load_checkpoint, print0,
                                save_checkpoint, save_pretrained, shard_model, sum_counters)
from common.model import load_reward_model, load_tokenizer
from common.reweight import make_reweighter


@dataclass
class Args:
    # experiment
    exp_name: str = "reward_model"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order"""
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
    save_every: int = 0
    """save a checkpoint every this many steps (0: never)"""
    log_every: int = 10
    """log metrics every this many steps"""

    # model and data
    model_name_or_path: str = "toy"
    """hub id or local path of a causal LM (usually an SFT model) to start from; `toy` is a random tiny Llama"""
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
    """how much each pair counts: none (the data's weights) or python:MODULE:FUNCTION (common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""

    # optimization
    max_steps: int = 200
    """optimizer steps"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW"""
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

    # reward model
    center_rewards: bool = True
    """after training, record the mean reward of training responses so scoring subtracts it"""
    num_center_pairs: int = 1024
    """training pairs used to estimate that mean"""

    # evaluation
    eval_every: int = 50
    """evaluate every this many steps (and at the start and the end)"""
    num_eval_pairs: int = 512
    """held-out pairs for eval/loss and eval/accuracy"""


def bradley_terry_loss(rewards1, rewards2, reward1, reward2, weights):
    """Weighted per-pair losses and margins. rewards*: the model's r(x, y) for each generation (B,);
    reward*: the data's rewards, which say which generation is preferred."""
    generation2_preferred = reward2 > reward1
    chosen_rewards = torch.where(generation2_preferred, rewards2, rewards1)
    rejected_rewards = torch.where(generation2_preferred, rewards1, rewards2)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    return weights * losses, margins.detach(), chosen_rewards.detach(), rejected_rewards.detach()


def forward(model, batch):
    """Both generations of every pair in one concatenated forward, then the loss."""
    ids = torch.cat([batch["generation1_token_ids"], batch["generation2_token_ids"]])  # (2B, T)
    attention_mask = torch.cat([batch["generation1_attention_mask"], batch["generation2_attention_mask"]])
    rewards1, rewards2 = model(input_ids=ids, attention_mask=attention_mask).logits[:, 0].float().chunk(2)  # (B,), (B,)
    weights = (batch["generation1_weight"] + batch["generation2_weight"]) / 2
    return bradley_terry_loss(rewards1, rewards2, batch["generation1_reward"], batch["generation2_reward"], weights)


@torch.no_grad()
def evaluate(model, batches, num_pairs) -> dict:
    """Mean loss, accuracy and reward over held-out pairs (every process's share)."""
    sums = torch.zeros(3)
    for batch in batches:
        losses, margins, chosen_rewards, rejected_rewards = forward(model, batch)
        sums += torch.stack([losses.sum(), (margins > 0).float().sum(), (chosen_rewards + rejected_rewards).sum() / 2]).cpu()
    loss, accuracy, mean_reward = (all_reduce(sums) / num_pairs).tolist()
    return {"loss": loss, "accuracy": accuracy, "reward_mean": mean_reward}


def main(args: Args):
    _, world_size, device = init_distributed(args.seed)
    global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * world_size
    print0(f"{world_size} process(es) on {device.type}; global batch {global_batch_size} pairs = {args.per_device_batch_size} "
           f"per device x {args.gradient_accumulation_steps} accumulation x {world_size} processes")

    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_reward_model(args.model_name_or_path, tokenizer, device, from_causal_lm=True)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard_model(model, device)
    rows = tokenize_records(load_records(args.dataset, args.dataset_split, "pairwise"), tokenizer, args.max_length, args.max_prompt_length)
    reweighter = make_reweighter(args.reweighter)
    factory = BatchFactory(rows, tokenizer.pad_token_id, args.per_device_batch_size, args.gradient_accumulation_steps, args.seed,
                           args.group_by_length, reweighter)
    eval_records = load_eval_records(args.dataset, args.eval_dataset, args.eval_split, "pairwise", args.num_eval_pairs)
    eval_rows = tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length) if eval_records else []
    eval_batches = shard_batches(eval_rows, tokenizer.pad_token_id, args.per_device_batch_size, device)
    num_eval_pairs = sum(len(b["prompt"]) for b in eval_batches) * world_size

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)  # one kernel for all parameters
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, model, optimizer, scheduler)
        factory.load_state_dict(data_state)
    tracker = Tracker(args, resume_step=start_step if args.resume else None)

    model.train()
    for step in tqdm(range(start_step, args.max_steps), disable=not is_main(), initial=start_step, total=args.max_steps):
        if eval_batches and (step % args.eval_every == 0):
            metrics = evaluate(model, eval_batches, num_eval_pairs)
            tracker.log(step, {"eval/loss": metrics["loss"], "eval/accuracy": metrics["accuracy"]})
        step_start = time.perf_counter()
        # 1. get batch: this process's micro-batches of pairs for one optimizer step
        batches = [to_device(b, device) for b in factory.next_step()]
        num_pairs = all_reduce(sum(len(b["prompt"]) for b in batches)).item()
        sums = torch.zeros(4)
        for i, batch in enumerate(batches):
            model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce gradients once per step
            # 2. forward: chosen and rejected in one concatenated forward
            losses, margins, chosen_rewards, rejected_rewards = forward(model, batch)
            # 3. loss: weighted losses over this micro-batch / global pair count; FSDP averages gradients
            # over processes, so * world_size makes the sum over processes the global mean
            loss = losses.sum() / num_pairs * world_size
            loss.backward()
            sums += torch.stack([losses.sum(), (margins > 0).float().sum(), chosen_rewards.sum(), rejected_rewards.sum()]).detach().cpu()
        # 4. step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 5. log
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            loss, accuracy, chosen, rejected = (all_reduce(sums) / num_pairs).tolist()
            elapsed = time.perf_counter() - step_start
            tracker.log(step + 1, {
                "train/loss": loss, "train/accuracy": accuracy, "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "train/grad_norm": grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm,
                "train/lr": scheduler.get_last_lr()[0], "train/pairs_per_s": num_pairs / elapsed,
            })
            if reweighter is not None:
                tracker.log(step + 1, reweighter.metrics(sum_counters(reweighter.stats)))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, model, optimizer, scheduler, factory.state_dict())

    if eval_batches:
        metrics = evaluate(model, eval_batches, num_eval_pairs)
        tracker.log(args.max_steps, {"eval/loss": metrics["loss"], "eval/accuracy": metrics["accuracy"]})
        print0(f"eval/accuracy {metrics['accuracy']:.3f}, eval/loss {metrics['loss']:.3f}")
    if args.center_rewards:
        center_batches = shard_batches(rows[: args.num_center_pairs], tokenizer.pad_token_id, args.per_device_batch_size, device)
        model.config.reward_mean = evaluate(model, center_batches, sum(len(b["prompt"]) for b in center_batches) * world_size)["reward_mean"]
        print0(f"centred: reward_mean {model.config.reward_mean:.4f} recorded in the config")
    save_pretrained(model, tokenizer, args.output_dir)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
