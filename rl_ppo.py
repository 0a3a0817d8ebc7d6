"""PPO against an online reward model or annotator (setup 3), and the critic-free group estimators RLOO and GRPO.

Each step samples responses y to dataset prompts x from the policy, scores them with the annotator, and improves
the policy on them for --num_ppo_epochs passes. With logprobs and ref_logprobs the per-token log-probs of the
sampled tokens under the policy that sampled them and under the reference, at the sampling temperature:

    kl         = logprobs - ref_logprobs                              (per token; k1)
    gae (PPO, the default; Ouyang et al. 2022, Huang et al. 2024 "The N+ implementation details of RLHF with PPO"):
        rewards    = -kl_coef * kl,  plus the score on the response's last token
        advantages = GAE(rewards, values; gamma, lam),  returns = advantages + values,  then whitened over the batch
    rloo (Ahmadian et al. 2024): num_samples k responses per prompt, R = score - kl_coef * sum_t kl
        advantages = R_i - mean_{j != i} R_j                          (the same for every token of y_i)
    grpo (Shao et al. 2024): advantages = (score_i - mean_group) / std_group;  dr_grpo (Liu et al. 2025): no std
        their KL is a term of the loss, not of the reward: kl_coef * k3 per token
    ratio      = exp(new_logprobs - logprobs)
    pg_losses  = max(-advantages * ratio, -advantages * clamp(ratio, 1 - cliprange, 1 + cliprange))
    vf_losses  = 0.5 * max((values_new - returns)^2, (clamp(values_new, values +- cliprange_value) - returns)^2)
    loss       = sum_tokens weights * (pg_losses + vf_coef * vf_losses [+ kl_coef * k3]) / num_tokens  (gae, rloo)
                 sum_sequences weights * mean_tokens(...) / num_sequences                          (grpo)
                 sum_tokens weights * (...) / (num_sequences * max_new_tokens)                     (dr_grpo)
    num_tokens, num_sequences: of the global minibatch (every micro-batch on every process)

https://arxiv.org/abs/2203.02155  https://arxiv.org/abs/2403.17031  https://arxiv.org/abs/2402.14740
https://arxiv.org/abs/2402.03300  https://arxiv.org/abs/2503.20783

The estimators are a flag of this script, not forks: they share the rollout, the clipped surrogate and the loop,
and differ in two blocks (3. the advantages, 5. the loss's reduction) and in where the KL goes (`kl_in_loss`); gae
alone has a critic. A group's k samples stay together in every micro-batch and share one forward of their prompt
(common.logps.shared_prompt_logps).

    python sft.py --output_dir runs/sft && python rl_ppo.py --model_name_or_path runs/sft
    python rl_ppo.py --model_name_or_path runs/sft --estimator grpo
    python reward_model.py --model_name_or_path runs/sft --output_dir runs/rm && python rl_ppo.py \\
        --model_name_or_path runs/sft --annotator reward_model:runs/rm --kl_coef 1.0
    torchrun --nproc_per_node 8 rl_ppo.py --model_name_or_path runs/sft-hh --dataset hh \\
        --annotator reward_model:runs/rm-hh --generation.max_new_tokens 256 --learning_rate 3e-6

Departures from the papers (as the N+ details do, unless said):
1. The score goes on the response's last token, its EOS when it has one (the N+ details put it one past). A
   response without EOS gets --missing_eos_penalty instead of its score.
2. The critic starts from the reward model when the annotator is one with the policy's tokenizer (the N+ details),
   else from the policy with a new head (--critic to choose); policy and critic share one optimizer and loss.
3. The learning rate follows a cosine schedule over the steps (rollouts), not a linear decay.
4. A group with a sample the annotator fails to score is dropped whole, and more prompts are sampled
   (common/online.py); a rollout that cannot be filled is padded with dropped groups that nothing trains on.
5. With one epoch of one minibatch (grpo, dr_grpo), the rollout's log-probs are those of the update's own forward
   (the policy that sampled is the one updated: ratio 1), not of a forward of their own: they are NaN until then, so
   that a change that reads them earlier (a KL in grpo's reward) fails loudly instead of silently.
"""

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from transformers import get_cosine_schedule_with_warmup

from common import online
from common.annotators import JudgeArgs, make_annotator
from common.batch import collate, to_device, training_tokens
from common.checkpoint import claim_output_dir, load_checkpoint, save_checkpoint, save_pretrained
from common.data import load_records
from common.distributed import (
    FiniteSteps,
    all_reduce,
    cleanup,
    clip_grad_norm,
    compute_dtype,
    init_distributed,
    moments,
    prepare_model,
    print0,
    sum_over_processes,
    sync_gradients,
    trainable_parameters,
    whiten,
)
from common.evaluation import EvalArgs, held_out_eval
from common.flags import check_eval_args, check_online_args, check_shared_args, fail, require
from common.generation import GenerationArgs
from common.logps import shared_prompt_logps, token_values
from common.model import LoraArgs, adapters_off, add_lora, load_causal_lm, load_tokenizer, load_value_model
from common.reweight import check_reweighter, make_reweighter
from common.tracking import Means, Tracker


@dataclass
class Args:
    # experiment
    exp_name: str = "ppo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed for data order, sampling and new weights"""
    output_dir: str = "runs/ppo"
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
    max_prompt_length: int = 256
    """longest prompt in tokens (longer prompts keep their end)"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding); the order of batches stays random"""
    reweighter: str = "none"
    """how much each response counts: none (the data's weights) or python:MODULE:FUNCTION (of the rows, or of
    (batch, policy) in the update: common/reweight.py)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """what forwards compute in: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; weights and optimizer states stay
    fp32 (bf16 is mixed precision)"""
    lora: LoraArgs = field(default_factory=LoraArgs)

    # optimization
    max_steps: int = 100
    """rollouts (each: sample, score, then num_ppo_epochs passes over it)"""
    learning_rate: float = 2e-4
    """peak learning rate of AdamW (policy and critic)"""
    per_device_batch_size: int = 32
    """examples (pairs, in the pairwise scripts) per micro-batch on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    warmup_steps: int = 5
    """linear warmup steps, then cosine decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # PPO
    estimator: Literal["gae", "rloo", "grpo", "dr_grpo"] = "gae"
    """advantages: gae (PPO with a critic), or from a group of num_samples responses per prompt: rloo, grpo, dr_grpo"""
    num_samples: int | None = None
    """responses per prompt (default: 1 with gae, 4 with a group estimator)"""
    num_minibatches: int = 2
    """optimizer steps per pass over a rollout; the rollout holds per_device_batch_size * gradient_accumulation_steps
    * num_minibatches responses per process"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    cliprange: float = 0.2
    """the policy ratio's clip range"""
    cliprange_value: float = 0.2
    """the value's clip range around the rollout's values"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    kl_coef: float = 0.05
    """weight of the KL to the reference (in the reward for gae and rloo; in the loss, as k3, for grpo, dr_grpo). It
    is in the scores' units: scale it with their spread (objective/scores_std; the toy reward's is about 0.25, the toy
    reward model's about 4.5, which needs about 1.0 where the toy reward takes the default)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE's lambda"""
    missing_eos_penalty: float | None = -1.0
    """score of a response that did not end (no EOS within max_new_tokens), instead of the annotator's; None: off"""
    critic: str = "auto"
    """where the critic starts (gae): auto (the reward model of --annotator reward_model:PATH when it has the
    policy's tokenizer, else the policy with a new head) or a path"""

    # online
    annotator: str = "toy"
    """toy, reward_model:PATH, judge:PATH, http:URL, or python:MODULE:FUNCTION (common/annotators.py)"""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)

    # evaluation
    eval_every: int = 25
    """evaluate every this many steps (and at the start and the end)"""
    eval: EvalArgs = field(default_factory=EvalArgs)


def policy_losses(advantages, ratio, cliprange):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7, as a loss): the pessimistic one of the two."""
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.max(pg_losses, pg_losses2)


def value_losses(new_values, values, returns, cliprange_value):
    """The clipped value loss per token: new values may move cliprange_value from the rollout's values for free."""
    values_clipped = values + torch.clamp(new_values - values, -cliprange_value, cliprange_value)
    return 0.5 * torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)


def gae(rewards, values, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), (N, T), from per-token rewards and values (N, T) that
    are zero after each response (so each response ends in a terminal state):
    delta_t = rewards_t + gamma * values_{t+1} - values_t,  advantages_t = delta_t + gamma * lam * advantages_{t+1}."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


def group_advantages(rewards, num_samples, estimator):
    """Advantages (N,) of sequence rewards (N,), groups of num_samples adjacent: rloo's leave-one-out baseline,
    grpo's group-normalised score, dr_grpo's mean-centred score."""
    grouped = rewards.view(-1, num_samples)  # (N / k, k)
    if estimator == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_samples - 1)  # mean of the others
        return (grouped - baseline).flatten()
    centred = grouped - grouped.mean(1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    return centred.flatten()


def select(rollout, rows, num_samples):
    """A micro-batch: the rollout's rows (whole groups, in order), cut to the columns they use."""
    prompts = rows[::num_samples] // num_samples
    prompt_length = int(rollout["prompt_mask"][prompts].sum(-1).max())
    response_length = int(rollout["response_mask"][rows].sum(-1).max())
    batch = {key: value[rows] for key, value in rollout.items() if not key.startswith("prompt")}
    batch = {key: value[:, :response_length] if value.dim() == 2 else value for key, value in batch.items()}
    batch["prompt_ids"] = rollout["prompt_ids"][prompts][:, -prompt_length:]
    batch["prompt_mask"] = rollout["prompt_mask"][prompts][:, -prompt_length:]
    return batch


def label_groups(prompts, groups, scores) -> list[list[dict]]:
    """Each prompt's k samples and their scores (flat, prompt by prompt) -> the prompt's group of k rows, each with its
    score as generation1_reward; trainable only where every score of the group came back (departure 4)."""
    labelled, k = [], len(groups[0])
    for i, (prompt, group) in enumerate(zip(prompts, groups)):
        group_scores = scores[i * k : (i + 1) * k]
        kept = None not in group_scores
        labelled.append([online.example(prompt, [s], [score], kept) for s, score in zip(group, group_scores)])
    return labelled


def critic_path(args, tokenizer) -> str | None:
    """Where the critic starts (departure 2); None without one (the group estimators)."""
    if args.estimator != "gae":
        return None
    kind, _, reward_model = args.annotator.partition(":")
    path = args.critic
    if path == "auto":
        if kind != "reward_model":
            return args.model_name_or_path
        path = reward_model
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        if args.critic != "auto":
            fail(f"--critic {path}: its tokenizer differs from the policy's; the critic reads the policy's tokens")
        print0(f"the reward model {path} has another tokenizer than the policy: the critic starts from the policy")
        return args.model_name_or_path
    return path


def check_args(args: Args):
    """Every flag's range, before any work; common.flags checks the flags the scripts share."""
    check_shared_args(args)
    check_eval_args(args.eval, args.generation.max_new_tokens, args.dataset)
    check_online_args(args)
    why = (
        " (its samples are the policy's own, each scored alone; python:M:F(batch, policy) sees the update's log-probs)"
    )
    check_reweighter(args.reweighter, ("none", "python"), "rl_ppo.py", why)
    k = args.num_samples
    require(k >= 1, "num_samples", k, "must be at least 1")
    if args.estimator != "gae":
        require(k >= 2, "num_samples", k, f"must be at least 2: --estimator {args.estimator} compares a group")
    require(
        args.per_device_batch_size % k == 0,
        "per_device_batch_size",
        args.per_device_batch_size,
        f"must be a multiple of --num_samples ({k}): a group's samples share a micro-batch",
    )
    require(args.num_minibatches >= 1, "num_minibatches", args.num_minibatches, "must be at least 1")
    require(args.num_ppo_epochs >= 1, "num_ppo_epochs", args.num_ppo_epochs, "must be at least 1")
    require(args.cliprange > 0, "cliprange", args.cliprange, "must be above 0")
    require(args.cliprange_value > 0, "cliprange_value", args.cliprange_value, "must be above 0")
    require(args.vf_coef >= 0, "vf_coef", args.vf_coef, "must be 0 or more")
    require(args.kl_coef >= 0, "kl_coef", args.kl_coef, "must be 0 or more")
    require(0 <= args.gamma <= 1, "gamma", args.gamma, "must be in [0, 1]")
    require(0 <= args.lam <= 1, "lam", args.lam, "must be in [0, 1]")
    if args.missing_eos_penalty is not None:
        require(math.isfinite(args.missing_eos_penalty), "missing_eos_penalty", args.missing_eos_penalty, "finite")
    if args.critic != "auto" and args.estimator != "gae":
        fail(f"--critic: --estimator {args.estimator} has no critic (its baseline comes from the group)")


def main(args: Args):
    if args.num_samples is None:
        args.num_samples = 1 if args.estimator == "gae" else 4
    check_args(args)
    _, world_size, device = init_distributed(args.seed)
    dtype = compute_dtype(args.dtype, device)
    run_id = claim_output_dir(args.output_dir, args.resume, args.overwrite)  # before any work, so it fails fast
    k, micro_batch_size = args.num_samples, args.per_device_batch_size
    reweighter = make_reweighter(args.reweighter)
    sees_policy = reweighter is not None and reweighter.sees_policy
    kl_in_loss = args.estimator in ("grpo", "dr_grpo")  # k3 in the loss; gae and rloo put k1 in the reward
    single_pass = kl_in_loss and args.num_ppo_epochs == args.num_minibatches == 1  # departure 5
    minibatch_size = micro_batch_size * args.gradient_accumulation_steps  # responses per process
    rollout_size = minibatch_size * args.num_minibatches
    print0(
        f"{world_size} process(es) on {device.type}, computing in {dtype}; {args.estimator}: rollouts of "
        f"{rollout_size * world_size} responses ({k} per prompt), {args.num_ppo_epochs} epochs x "
        f"{args.num_minibatches} minibatches of {minibatch_size * world_size} = {micro_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {world_size} processes; learning rate {args.learning_rate}"
    )

    tokenizer = load_tokenizer(args.model_name_or_path)
    records = load_records(args.dataset, args.dataset_split, "prompt")  # data first: bad data fails before a model
    annotator = make_annotator(args.annotator, device, args.judge, dtype)
    policy = load_causal_lm(args.model_name_or_path, tokenizer, device, args.gradient_checkpointing)
    policy = prepare_model(add_lora(policy, args.lora, args.model_name_or_path), device, dtype)
    reference = policy  # with LoRA the policy with its adapters off (common.model.adapters_off), else frozen anew
    if not args.lora.r:
        reference = load_causal_lm(args.model_name_or_path, tokenizer, device)
        reference = prepare_model(reference, device, dtype, trainable=False).eval()
    critic, path = None, critic_path(args, tokenizer)
    if path is not None:
        print0(f"critic from {path}")
        critic = load_value_model(path, tokenizer, device, args.gradient_checkpointing)
        critic = prepare_model(add_lora(critic, args.lora, path, modules_to_save=["score"]), device, dtype)
    # one rollout per step: every response of this process, the groups of k adjacent
    sampler = online.OnlineSampler.from_args(args, records, tokenizer, annotator, device, rollout_size, k)
    held_out = held_out_eval(args, tokenizer, device, dtype, annotator, args.annotator)

    def evaluate(step: int, tracker: Tracker) -> dict:
        """The held-out samples' eval/* (common/evaluation.py)."""
        return held_out(step, policy, reference, tracker) if held_out is not None else {}

    trained = torch.nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    optimizer = torch.optim.AdamW(
        trainable_parameters(trained), args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    start_step = 0
    if args.resume:
        start_step, data_state = load_checkpoint(args.output_dir, trained, optimizer, scheduler)
        sampler.load_state_dict(data_state)
    derived = {"rollout_size": rollout_size * world_size, "minibatch_size": minibatch_size * world_size}
    tracker = Tracker(args, run_id, derived | {"world_size": world_size}, start_step if args.resume else None)
    if start_step == 0:
        tracker.log(0, evaluate(0, tracker))
    temperature = args.generation.temperature
    finite = FiniteSteps(dtype)  # a non-finite loss or gradient never reaches the weights
    trained.train()
    for module in trained.modules():  # no dropout (the N+ details): a forward must give the rollout's log-probs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    for step in tracker.progress(range(start_step, args.max_steps), args.max_steps):  # a bar with loss, tokens/s
        step_start = time.perf_counter()
        seconds = defaultdict(float)  # where the step's time goes
        # 1. rollout: sample k responses to each prompt and score each with the annotator; a group with a failed
        # score is dropped and more prompts are sampled (departure 4)
        for prompts in sampler.rounds():
            groups = sampler.sample(policy, prompts, num_samples=k)  # per prompt: its k responses
            responses = [sample["response"] for group in groups for sample in group]
            scores = annotator.score([p["raw_prompt"] for p in prompts for _ in range(k)], responses)
            sampler.add(label_groups(prompts, groups, scores), failed=scores.count(None))
        step_rows = sampler.step_rows()
        step_rows = reweighter(step_rows) if reweighter is not None else step_rows
        batch = to_device(collate(step_rows, tokenizer.pad_token_id), device)
        seconds["sampling"] = sampler.stats["sampling_seconds"]
        seconds["scoring"] = time.perf_counter() - step_start - seconds["sampling"]
        rollout = {
            "prompt_ids": batch["prompt_token_ids"][::k],  # (N / k, Tp): a group's samples share their prompt
            "prompt_mask": batch["prompt_attention_mask"][::k],
            "response_ids": batch["generation1_response_token_ids"],  # (N, Tr)
            "response_mask": batch["generation1_response_attention_mask"],
            "weights": batch["generation1_weight"],  # (N,), 0 where not trainable
            "trainable": batch["trainable"],
        }
        response_mask, trainable = rollout["response_mask"], batch["trainable"]
        lengths = response_mask.sum(-1)
        last_tokens = rollout["response_ids"].gather(1, (lengths - 1)[:, None])[:, 0]
        contains_eos = last_tokens == tokenizer.eos_token_id
        scores = torch.where(trainable, batch["generation1_reward"], 0.0)  # failed: NaN, not trainable
        if args.missing_eos_penalty is not None:  # departure 1
            scores = torch.where(contains_eos, scores, args.missing_eos_penalty)

        # 2. the rollout's log-probs under the policy (but with a single pass: departure 5) and the reference, and
        # the critic's values, without gradient
        forwards = defaultdict(list)
        with torch.no_grad():
            for start in range(0, rollout_size, micro_batch_size):
                mb = select(rollout, torch.arange(start, start + micro_batch_size, device=device), k)
                inputs = mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"]
                if not single_pass:
                    tick = time.perf_counter()
                    logprobs, stats = shared_prompt_logps(policy, *inputs, temperature, with_stats=True)
                    forwards["logprobs"].append(logprobs)
                    forwards["entropy"].append(stats["entropy"])
                    seconds["policy"] += time.perf_counter() - tick
                tick = time.perf_counter()
                with adapters_off(reference):
                    forwards["ref_logprobs"].append(shared_prompt_logps(reference, *inputs, temperature))
                seconds["reference"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if critic is not None:
                    forwards["values"].append(token_values(critic, *inputs))
                seconds["critic"] += time.perf_counter() - tick
        width = response_mask.shape[1]  # micro-batches are cut to their own longest response: pad back to (N, Tr)
        for key, parts in forwards.items():
            rollout[key] = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
        if single_pass:  # filled in by the update
            rollout["logprobs"], rollout["entropy"] = torch.full((2, *response_mask.shape), math.nan, device=device)
        logprobs, ref_logprobs = rollout["logprobs"], rollout["ref_logprobs"]
        values = rollout.get("values", torch.zeros_like(logprobs))

        # 3. advantages, the estimator's first block
        trained_tokens = response_mask * trainable[:, None]  # the rows that only fill a rollout count nowhere
        kl = logprobs - ref_logprobs  # (N, Tr), zero at padding
        if args.estimator == "gae":
            rewards = -args.kl_coef * kl
            rewards[torch.arange(len(rewards)), lengths - 1] += scores  # the score on the last token (departure 1)
            advantages = gae(rewards, values, args.gamma, args.lam)
            rollout["returns"] = advantages + values
            rollout["advantages"] = whiten(advantages, trained_tokens)
        else:
            sequence_rewards = scores - args.kl_coef * kl.sum(-1) if args.estimator == "rloo" else scores
            rollout["advantages"] = group_advantages(sequence_rewards, k, args.estimator)[:, None] * response_mask

        # 4. PPO epochs: num_minibatches optimizer steps per pass, each over whole groups in a fresh order
        means = Means()  # the update's diagnostics, each a mean over what its mask counts
        update_start = time.perf_counter()
        for epoch in range(args.num_ppo_epochs):
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + epoch)
            order = torch.randperm(rollout_size // k, generator=generator).to(device)
            for m in range(args.num_minibatches):
                groups = order[m * minibatch_size // k : (m + 1) * minibatch_size // k]
                rows = (groups[:, None] * k + torch.arange(k, device=device)).flatten()
                # the reduction's denominators, of the global minibatch's trainable responses
                num_tokens = max(all_reduce(trained_tokens[rows].sum()).item(), 1)
                num_sequences = max(all_reduce(trainable[rows].sum()).item(), 1)
                minibatch_loss = 0.0
                for a in range(args.gradient_accumulation_steps):
                    for model in trained.values():
                        sync_gradients(model, a == args.gradient_accumulation_steps - 1)  # once per optimizer step
                    micro_rows = rows[a * micro_batch_size : (a + 1) * micro_batch_size]
                    mb = select(rollout, micro_rows, k)
                    inputs = mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"]
                    mask, w = mb["response_mask"] * mb["trainable"][:, None], mb["weights"][:, None]
                    new_logprobs, stats = shared_prompt_logps(policy, *inputs, temperature, with_stats=True)
                    if single_pass:  # the rollout's log-probs are these (departure 5)
                        mb["logprobs"] = new_logprobs.detach()
                        rollout["logprobs"][micro_rows, : mask.shape[1]] = mb["logprobs"]
                        rollout["entropy"][micro_rows, : mask.shape[1]] = stats["entropy"]
                    if sees_policy:  # python:MODULE:FUNCTION(batch, policy): factors from this forward, as constants
                        w = reweighter.reweigh(mb, stats, w[:, 0])[:, None]
                    logratio = (new_logprobs - mb["logprobs"]) * mask
                    ratio = torch.exp(logratio)
                    pg_losses = policy_losses(mb["advantages"], ratio, args.cliprange)
                    token_losses = pg_losses
                    if critic is not None:
                        new_values = token_values(critic, *inputs)
                        vf_losses = value_losses(new_values, mb["values"], mb["returns"], args.cliprange_value)
                        token_losses = token_losses + args.vf_coef * vf_losses
                        means.add("loss/value", w * vf_losses, mask)
                        means.add("value/clip_fraction", (new_values - mb["values"]).abs() > args.cliprange_value, mask)
                    if kl_in_loss:
                        log_ref_ratio = mb["ref_logprobs"] - new_logprobs
                        kl_losses = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3, unbiased and >= 0
                        token_losses = token_losses + args.kl_coef * kl_losses
                        means.add("loss/kl", w * kl_losses, mask)

                    # 5. loss, the estimator's second block: weighted sums over this micro-batch over the global
                    # minibatch's count (of tokens, sequences or max_new_tokens per sequence); the micro-batches add
                    # up to this process's share of the global mean, and FSDP averages gradients over processes, so
                    # * world_size makes their sum the global mean
                    if args.estimator == "grpo":  # each sequence's token mean, then the mean over sequences
                        sequence_losses = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                        loss = (w[:, 0] * sequence_losses).sum() / num_sequences * world_size
                    elif args.estimator == "dr_grpo":  # a constant length: no bias to long or short responses
                        normaliser = num_sequences * args.generation.max_new_tokens
                        loss = (w * token_losses * mask).sum() / normaliser * world_size
                    else:
                        loss = (w * token_losses * mask).sum() / num_tokens * world_size
                    loss.backward()
                    minibatch_loss += loss.detach()
                    means.add("policy/approx_kl", ratio - 1 - logratio, mask)  # k3 of the new policy vs the rollout's
                    means.add("policy/clip_fraction", (ratio - 1).abs() > args.cliprange, mask)
                    means.add("policy/ratio", ratio, mask)
                    means.add("loss/policy", w * pg_losses, mask)
                grad_norm = clip_grad_norm(trained, args.max_grad_norm)
                if finite(f"step {step + 1} (epoch {epoch + 1}, minibatch {m + 1})", minibatch_loss, grad_norm):
                    optimizer.step()  # unless the loss or a gradient is not finite
                optimizer.zero_grad(set_to_none=True)
                # train/loss: the mean of the minibatch losses (each process adds its share, counting 1 / world_size)
                means.add("train/loss", minibatch_loss / world_size, torch.tensor(1 / world_size))
        scheduler.step()
        seconds["update"] = time.perf_counter() - update_start

        # 6. log: one object per step in metrics.jsonl
        metrics = {}
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - step_start
            means.add("objective/kl", (rollout["logprobs"] - ref_logprobs).sum(-1), trainable)  # sequence KL to ref
            means.add("objective/entropy", rollout["entropy"], trained_tokens)
            means.add("objective/eos_rate", contains_eos.float(), trainable)
            score_mean, score_variance = moments(scores, trainable.double())
            metrics |= means.result() | {
                "objective/scores": score_mean.item(),
                "objective/scores_std": math.sqrt(max(score_variance.item(), 0)),
                "train/grad_norm": grad_norm,
                "train/nonfinite_steps": finite.skipped,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": all_reduce(training_tokens([batch])).item() / elapsed,
            }
            if critic is not None:  # how much of the returns' variance the rollout's values explain
                explained = 1 - moments(rollout["returns"] - values, trained_tokens)[1] / moments(
                    rollout["returns"], trained_tokens
                )[1].clamp(min=1e-12)
                metrics["value/explained_variance"] = explained.item()
            # seconds per step, averaged over processes
            metrics |= {f"time/{name}": value / world_size for name, value in sum_over_processes(seconds).items()}
            if reweighter is not None:
                metrics |= reweighter.metrics(sum_over_processes(reweighter.stats))
            metrics |= online.metrics(sum_over_processes(sampler.stats))
            tracker.log_table(step + 1, "online_samples", online.sample_table(step_rows))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            metrics |= evaluate(step + 1, tracker)
        if metrics:
            tracker.log(step + 1, metrics)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, trained, optimizer, scheduler, sampler.state_dict(), run_id)

    save_pretrained(policy, tokenizer, args.output_dir, args.lora.merge)
    if critic is not None:
        save_pretrained(critic, tokenizer, f"{args.output_dir}/critic", args.lora.merge)
    print0(f"saved to {args.output_dir}")
    tracker.finish()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
