"""The mechanics of an online step (setups 3, 5, 7), which the scripts' phase 1 spells out:

    for prompts in sampler.rounds():                     # the dataset's prompts, until every process holds a step
        samples = sampler.sample(policy, prompts, k)     # k responses to each, from the policy as it is now
        ...                                              # the annotator, then the script's rule: each prompt's rows
        sampler.add(groups, failed)                      # (a group: a prompt's rows, kept or dropped whole)
    rows = sampler.step_rows()                           # kept rows, then padding (trainable False) if still short

What the samples are labelled and which are kept is the script's rule, which sees a prompt's whole group of samples
(a best-of-n pair is a change in the script, not here). Rows are in common/batch.py's schema; `trainable` marks the
rows that only fill a step (every loss and diagnostic leaves them out).
"""

import math
import time
from collections import Counter

import torch
import torch.distributed as dist

from common import toy
from common.batch import GENERATIONS, BatchFactory, collate, row_length, tokenize_records
from common.distributed import all_reduce, print0
from common.flags import fail
from common.generation import generate


class OnlineSampler:
    """The online steps of a run: the dataset's prompts (only the prompts: the dataset's responses came from another
    model) in the seeded stream of an offline BatchFactory, samples of them from the policy, and the rounds of
    sampling that fill a step.

    Every process ends a step with exactly `size` rows (the contract that keeps FSDP's collectives in step), in whole
    groups of group_size rows (a prompt's rows, kept or dropped together). `rounds()` yields the prompts of each round
    while any process holds fewer kept rows than `size`: all processes take the same rounds (the largest shortfall
    decides), each sized by the rate kept so far. After max_rounds, or a round in which the annotator failed on every
    example on every process (a judge that is down or past its deadline costs one round, not max_rounds),
    `step_rows()` fills what is missing with dropped groups (trainable False, weight 0), counted as online/padded. A
    step on which no process kept anything is reported; max_untrainable_steps of them in a row stop the run, as does a
    step on which the annotator failed on every example.

    Sampling draws from a generator of this process's own, seeded with (seed, rank), so processes sample differently;
    its state is part of `state_dict()` with the prompt stream's position and the keep rate, so a resumed run samples
    what an uninterrupted one would. `stats` counts the step (`metrics`)."""

    def __init__(
        self,
        prompt_records: list[dict],
        tokenizer,
        generation,
        annotator,
        *,
        size: int,
        group_size: int = 1,
        max_prompt_length: int,
        seed: int,
        group_by_length: bool,
        device: torch.device,
        sample_reward=None,
        max_rounds: int = 8,
        max_untrainable_steps: int = 10,
    ):
        if size % group_size:
            fail(f"a step of {size} examples cannot hold whole groups of {group_size} samples of a prompt")
        rows = tokenize_records(prompt_records, tokenizer, max_prompt_length + 1, max_prompt_length)
        for row, record in zip(rows, prompt_records):
            row["raw_prompt"] = record["prompt"]  # the annotator gets the prompt as the data has it, not as rendered
        self.stream = BatchFactory(
            rows,
            pad_token_id=tokenizer.pad_token_id,
            micro_batch_size=size // group_size,
            gradient_accumulation_steps=1,
            seed=seed,
            group_by_length=group_by_length,
        )
        self.tokenizer, self.generation, self.annotator, self.device = tokenizer, generation, annotator, device
        self.size, self.group_size, self.sample_reward = size, group_size, sample_reward
        self.max_rounds, self.max_untrainable_steps = max_rounds, max_untrainable_steps
        # (seed, rank) -> this process's sampling stream; a single process draws what rank 0 of a torchrun draws
        self.generator = torch.Generator(device).manual_seed(seed * 1000 + dist.get_rank())
        self.keep_rate, self.untrainable_steps = 1.0, 0
        self.kept, self.dropped, self.stats = [], [], Counter()

    @classmethod
    def from_args(cls, args, records: list[dict], tokenizer, annotator, device, size: int, group_size: int = 1):
        """The sampler of a script's flags (--generation.*, --max_prompt_length, --seed, --group_by_length, --dataset:
        the toy task's true reward of the samples is logged), read by name."""
        return cls(
            records,
            tokenizer,
            args.generation,
            annotator,
            size=size,
            group_size=group_size,
            max_prompt_length=args.max_prompt_length,
            seed=args.seed,
            group_by_length=args.group_by_length,
            device=device,
            sample_reward=toy.true_reward if toy.is_toy(args.dataset) else None,
        )

    def rounds(self):
        """This step's rounds (a generator): the prompt rows of each; the loop body samples them and `add`s the rows."""
        self.kept, self.dropped, self.stats = [], [], Counter()
        self.annotator_before, k = Counter(self.annotator.stats), self.group_size
        for _ in range(self.max_rounds):
            missing = all_reduce(self.size - k * len(self.kept), op=dist.ReduceOp.MAX).item()
            if missing <= 0:
                break
            num_prompts = min(math.ceil(missing / k / max(self.keep_rate, 0.1)), 4 * self.size // k)
            kept_before, failed_before = len(self.kept), self.stats["failed"]
            prompts = []
            while len(prompts) < num_prompts:  # whole steps of the stream, so that its position stays a step count
                prompts += self.stream.next_rows()
            yield prompts[:num_prompts]
            self.keep_rate = 0.5 * self.keep_rate + 0.5 * (len(self.kept) - kept_before) / num_prompts
            # an annotator that failed on every example of a round is not asked again
            if all_reduce(self.stats["failed"] - failed_before == num_prompts * k).item() == dist.get_world_size():
                break

    def sample(self, policy, prompts: list[dict], num_samples: int) -> list[list[dict]]:
        """num_samples responses to each prompt row, sampled from the policy: per prompt, a list of num_samples
        {"response_ids", "response"}, the ids as sampled (EOS included where it stopped) and their text."""
        n = num_samples
        batch = collate(prompts, self.tokenizer.pad_token_id)
        start = time.perf_counter()
        response_ids, response_mask = generate(  # prompt i's n samples at rows i*n .. (i + 1)*n - 1
            policy,
            batch["prompt_token_ids"].to(self.device),
            batch["prompt_attention_mask"].to(self.device),
            **vars(self.generation),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=self.generator,
            num_samples=n,
        )
        self.stats["sampling_seconds"] += time.perf_counter() - start
        ids = [row[mask.bool()].tolist() for row, mask in zip(response_ids.cpu(), response_mask.cpu())]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        self.stats["generated_tokens"] += sum(map(len, ids))
        self.stats["responses"] += len(ids)
        self.stats["eos"] += sum(r[-1:] == [self.tokenizer.eos_token_id] for r in ids)
        if self.sample_reward is not None:
            self.stats["sample_reward"] += sum(
                self.sample_reward(batch["prompt"][i // n], text) for i, text in enumerate(texts)
            )
        samples = [{"response_ids": i, "response": t} for i, t in zip(ids, texts)]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def add(self, groups: list[list[dict]], failed: int):
        """A round's rows, a list per prompt (a group is kept when all its rows are trainable), and how many of the
        round's annotations failed."""
        for group in groups:
            (self.kept if all(row["trainable"] for row in group) else self.dropped).append(group)
        self.stats["examples"] += sum(map(len, groups))
        self.stats["failed"] += failed

    def step_rows(self) -> list[dict]:
        """This process's rows of the step: kept groups (those beyond `size` discarded), then dropped ones as padding
        if still short; grouped by length (less padding; a group stays whole and in order); each with a `position`
        unique within the step."""
        k, stats = self.group_size, self.stats
        counts = Counter(self.annotator.stats)
        counts.subtract(self.annotator_before)
        stats.update({f"annotator/{key}": count for key, count in counts.items()})
        stats["kept"] = k * len(self.kept)
        failed_everywhere, kept_anywhere = all_reduce(
            [stats["failed"] == stats["examples"], len(self.kept) > 0]
        ).tolist()
        if failed_everywhere == dist.get_world_size():  # every process decides together, or the others would hang
            fail(f"the annotator failed on every example of a step; annotator stats: {dict(self.annotator.stats)}")
        self.untrainable_steps = 0 if kept_anywhere else self.untrainable_steps + 1
        if self.untrainable_steps:
            unlabelled = stats["examples"] - stats["failed"] - stats["kept"]
            what = (
                f"{stats['examples']} examples: {stats['failed']} failed, {unlabelled} not labelled (ties, for pairs)"
            )
            print0(
                f"online: nothing to train on in this step ({self.untrainable_steps} in a row; this process: {what})"
            )
            if self.untrainable_steps >= self.max_untrainable_steps:
                fail(
                    f"online: {self.untrainable_steps} steps in a row with nothing to train on: the annotator "
                    f"({type(self.annotator).__name__}) labelled no example usable ({what} in the last step on "
                    "this process); check the annotator, or raise --generation.temperature so that samples differ"
                )
        groups = self.kept[: self.size // k]
        if k * len(groups) < self.size:  # still short: pad with dropped groups
            stats["padded"] += self.size - k * len(groups)
            groups += self.dropped[: self.size // k - len(groups)]
        groups = sorted(groups, key=lambda group: max(map(row_length, group)))
        return [
            {**row, "position": dist.get_rank() * self.size + i}
            for i, row in enumerate(row for group in groups for row in group)
        ]

    def state_dict(self) -> dict:
        return {
            "prompts": self.stream.state_dict(),
            "generator": self.generator.get_state(),
            "keep_rate": self.keep_rate,
            "untrainable_steps": self.untrainable_steps,
        }

    def load_state_dict(self, state: dict):
        self.stream.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"])
        self.keep_rate, self.untrainable_steps = state["keep_rate"], state["untrainable_steps"]


def example(prompt: dict, samples: list[dict], rewards, trainable: bool) -> dict:
    """A row of the batch schema from a prompt row and its sample(s) (generation1[, generation2]) with their rewards
    (NaN for None): weight 1, or 0 where it is not trainable (a dropped example, which may pad a step)."""
    row = {"prompt": prompt["prompt"], "prompt_ids": prompt["prompt_ids"], "trainable": trainable}
    for g, sample, reward in zip(GENERATIONS, samples, rewards):
        row |= {
            f"{g}_response_only": sample["response"],
            f"{g}_response_ids": sample["response_ids"],
            f"{g}_reward": math.nan if reward is None else reward,  # None: the annotator failed
            f"{g}_weight": float(trainable),
        }
    return row


def metrics(totals: dict) -> dict:
    """online/* and annotator/* from an OnlineSampler's stats summed over processes
    (common.distributed.sum_over_processes)."""
    responses, examples = max(totals.get("responses", 0), 1), max(totals.get("examples", 0), 1)
    metrics = {
        "online/response_length": totals.get("generated_tokens", 0) / responses,
        "online/eos_rate": totals.get("eos", 0) / responses,
        "online/kept_fraction": totals.get("kept", 0) / examples,
        "online/failed": totals.get("failed", 0) / examples,
        "online/padded": totals.get("padded", 0),
        # all processes' tokens over one process's sampling time (processes sample in parallel)
        "online/generated_tokens_per_s": totals.get("generated_tokens", 0)
        * dist.get_world_size()
        / max(totals.get("sampling_seconds", 0), 1e-9),
    }
    if "sample_reward" in totals:
        metrics["online/sample_reward"] = totals["sample_reward"] / responses
    return metrics | {key: value for key, value in totals.items() if key.startswith("annotator/")}


def sample_table(rows: list[dict], num_rows: int = 3) -> list[dict]:
    """A few of a step's rows for a look (Tracker.log_table): the prompt, the responses, their rewards."""
    keys = ["prompt"] + [
        f"{g}_{k}" for g in GENERATIONS for k in ("response_only", "reward") if f"{g}_reward" in rows[0]
    ]
    return [{key: row[key] for key in keys} | {"trainable": row["trainable"]} for row in rows[:num_rows]]
