"""The batch schema, tokenization and the BatchFactory.

A batch is a dict with these keys (DESIGN.md); generation2_* only for pairwise data:
  prompt                                  list[str]   prompt text (chat template applied)
  prompt_token_ids, prompt_attention_mask (B, Tp)     left-padded, ready for generation
  generation1                             list[str]   prompt + response text
  generation1_response_only               list[str]   response text
  generation1_token_ids, _attention_mask  (B, T)      prompt + response tokens, right-padded
  generation1_reward                      (B,) float  or None where the setup has no reward
  generation1_weight                      (B,) float  weight of the example in the loss (default 1.0)
and fields of our own, for the losses:
  generation1_response_mask               (B, T) bool True exactly at the response tokens (EOS included)
  generation1_response_token_ids, _response_attention_mask
                                          (B, Tr)     the response tokens alone, right-padded: prompt_token_ids
                                                      + these are the training sequences, so a prompt can run
                                                      once for all its generations (common.logps.shared_prompt_logps)
  generation1_reference_logps             (B,) float  sum of the response's log-probs under the reference
                                                      (only where precomputed: common/model.add_reference_logps)
  position                                (B,) long   where each example sits in the step: offline its position
                                                      in the data stream, online a number unique within the step
  preference                              (B,) float  online pairs: the annotator's probability that generation1
                                                      is better (1.0, 0.0, 0.5 a tie, or in between; NaN where
                                                      the annotation failed), whatever the script made of it
generation1 and generation2 are padded to the same lengths T and Tr so they can share one forward.

Tokenization: prompt and response are tokenized separately and concatenated, so the response tokens are
exactly the response's tokens; EOS is appended to every response that does not already end with it.
Too long: the prompt keeps its last max_prompt_length tokens (the latest turn), then the response is cut
to fit max_length (a cut response has no EOS). Chat prompts (lists of messages) go through the
tokenizer's chat template, which then owns the special tokens; text prompts get the tokenizer's own
(e.g. BOS).
"""

import math
import time
from collections import Counter

import torch
import torch.distributed as dist

from common.distributed import all_reduce, fail, print0
from common.generation import generate

GENERATIONS = ("generation1", "generation2")


def tokenize_records(records: list[dict], tokenizer, max_length: int, max_prompt_length: int) -> list[dict]:
    """Records (common/data.py) -> token rows that `collate` turns into batches."""
    if max_prompt_length >= max_length:
        fail(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}) "
            "to leave room for the response"
        )
    generations = [g for g in GENERATIONS if g in records[0]]
    texts = [render(record, generations, tokenizer) for record in records]  # (prompt text, [response texts])
    chat = [isinstance(record["prompt"], list) for record in records]
    prompt_ids = [None] * len(records)
    for is_chat in (True, False):
        rows = [i for i in range(len(records)) if chat[i] == is_chat]
        encoded = tokenize([texts[i][0] for i in rows], tokenizer, add_special_tokens=not is_chat) if rows else []
        for i, ids in zip(rows, encoded):
            prompt_ids[i] = ids
    responses = {g: tokenize([t[1][k] for t in texts], tokenizer) for k, g in enumerate(generations)}
    eos = tokenizer.eos_token_id
    out, cut_prompts, cut_responses = [], 0, 0
    for i, record in enumerate(records):
        row = {"prompt": texts[i][0], "prompt_ids": prompt_ids[i]}
        if len(prompt_ids[i]) > max_prompt_length:
            row["prompt_ids"] = prompt_ids[i][-max_prompt_length:]
            row["prompt"] = tokenizer.decode(row["prompt_ids"])
            cut_prompts += 1
        room = max_length - len(row["prompt_ids"])
        for k, g in enumerate(generations):
            ids = responses[g][i] if responses[g][i][-1:] == [eos] else responses[g][i] + [eos]
            cut_responses += len(ids) > room
            row[f"{g}_response_only"] = texts[i][1][k]
            row[f"{g}_response_ids"] = ids[:room]
            row[f"{g}_reward"] = record.get(f"{g}_reward")
            row[f"{g}_weight"] = record.get(f"{g}_weight", 1.0)
        out.append(row)
    if cut_prompts or cut_responses:
        print0(
            f"truncated {cut_prompts} of {len(out)} prompts to their last {max_prompt_length} tokens and "
            f"{cut_responses} responses to fit max_length {max_length}"
        )
    return out


def tokenize(texts: list[str], tokenizer, add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text; without the attention masks nobody reads (40% of the time on short texts)."""
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


def render(record: dict, generations: list[str], tokenizer) -> tuple[str, list[str]]:
    """(prompt text, response texts): the chat template's rendering for message prompts, else as is."""
    if not isinstance(record["prompt"], list):
        return record["prompt"], [record[g] for g in generations]
    if tokenizer.chat_template is None:
        fail(
            "the dataset is conversational (lists of messages) but the tokenizer has no chat template: "
            "use a chat model's tokenizer, or set tokenizer.chat_template"
        )
    prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    responses = []
    for g in generations:
        full = tokenizer.apply_chat_template(
            record["prompt"] + [{"role": "assistant", "content": record[g]}], tokenize=False
        )
        if not full.startswith(prompt):
            fail(
                "the chat template renders prompt + response without the rendered prompt as its prefix; "
                "cannot split them"
            )
        response = full[len(prompt) :]
        if (
            tokenizer.eos_token and tokenizer.eos_token in response
        ):  # end the response at the template's end-of-turn EOS
            response = response[: response.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
        responses.append(response)
    return prompt, responses


def pad(sequences: list[list[int]], pad_id: int, left: bool = False, length: int | None = None):
    """(ids, attention_mask), both (B, length) long tensors."""
    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Token rows -> one batch in the schema above."""
    generations = [g for g in GENERATIONS if f"{g}_response_ids" in rows[0]]
    prompt_ids = [r["prompt_ids"] for r in rows]
    batch = {"prompt": [r["prompt"] for r in rows]}
    batch["prompt_token_ids"], batch["prompt_attention_mask"] = pad(prompt_ids, pad_token_id, left=True)
    length = max(
        (len(p) + len(r[f"{g}_response_ids"]) for p, r in zip(prompt_ids, rows) for g in generations), default=0
    )
    response_length = max((len(r[f"{g}_response_ids"]) for r in rows for g in generations), default=0)
    for g in generations:
        ids, mask = pad([p + r[f"{g}_response_ids"] for p, r in zip(prompt_ids, rows)], pad_token_id, length=length)
        batch[f"{g}_response_token_ids"], batch[f"{g}_response_attention_mask"] = pad(
            [r[f"{g}_response_ids"] for r in rows], pad_token_id, length=response_length
        )
        response_mask = torch.zeros_like(mask, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompt_ids, rows)):
            response_mask[i, len(p) : len(p) + len(r[f"{g}_response_ids"])] = True
        rewards = [r[f"{g}_reward"] for r in rows]
        batch[g] = [r["prompt"] + r[f"{g}_response_only"] for r in rows]
        batch[f"{g}_response_only"] = [r[f"{g}_response_only"] for r in rows]
        batch[f"{g}_token_ids"], batch[f"{g}_attention_mask"], batch[f"{g}_response_mask"] = ids, mask, response_mask
        batch[f"{g}_reward"] = None if None in rewards else torch.tensor(rewards, dtype=torch.float)
        batch[f"{g}_weight"] = torch.tensor([r[f"{g}_weight"] for r in rows], dtype=torch.float)
        for name in ("reference_logps", "behaviour_logps"):  # precomputed (common.model.add_reference_logps)
            if f"{g}_{name}" in rows[0]:
                batch[f"{g}_{name}"] = torch.tensor([r[f"{g}_{name}"] for r in rows], dtype=torch.float)
    if "position" in rows[0]:
        batch["position"] = torch.tensor([r["position"] for r in rows])
    if "preference" in rows[0]:
        batch["preference"] = torch.tensor([math.nan if r["preference"] is None else r["preference"] for r in rows])
    return batch


def interleave_responses(batch: dict, generations=GENERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The responses alone, (B * G, Tr) ids and attention mask, each row's G generations adjacent: the layout in
    which common.logps.shared_prompt_logps runs each prompt once for all of them."""
    return tuple(
        torch.stack([batch[f"{g}_{key}"] for g in generations], 1).flatten(0, 1)
        for key in ("response_token_ids", "response_attention_mask")
    )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shard_batches(rows: list[dict], pad_token_id: int, batch_size: int, device: torch.device) -> list[dict]:
    """This process's share of `rows`, as batches on `device`. Every process gets as many rows (the remainder
    of an uneven split is left out), so all run the same number of forwards: FSDP's are collectives."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share = rows[: len(rows) // world_size * world_size][rank::world_size]
    return [
        to_device(collate(share[i : i + batch_size], pad_token_id), device) for i in range(0, len(share), batch_size)
    ]


class BatchFactory:
    """Offline batches: a seeded stream of shuffled epochs over the token rows, cut into global batches.

    `next_step()` returns this rank's micro-batches for the next optimizer step. Step s covers stream
    positions [s * G, (s + 1) * G) with G = micro_batch_size * gradient_accumulation_steps * world_size;
    rank r takes the r-th contiguous share. So the examples of a step do not depend on how the global
    batch is split, and the data position is just the step count (saved in checkpoints). Within a rank's
    share, rows are sorted by length before being cut into micro-batches: less padding, same gradient.
    A reweighter (common/reweight.py) multiplies the weights of each step's rows.
    The online factory (policy samples + annotator) has the same interface.
    """

    def __init__(
        self,
        rows: list[dict],
        *,
        pad_token_id: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        seed: int,
        group_by_length: bool = True,
        reweighter=None,
    ):
        self.rows, self.pad_token_id, self.seed, self.group_by_length = rows, pad_token_id, seed, group_by_length
        self.reweighter = reweighter
        self.micro_batch_size, self.gradient_accumulation_steps = micro_batch_size, gradient_accumulation_steps
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step, self.epoch, self.order = 0, None, None

    def next_step(self) -> list[dict]:
        rows = self.next_rows() if self.reweighter is None else self.reweighter(self.next_rows())
        rows = sorted(rows, key=row_length)
        return [
            collate(rows[k : k + self.micro_batch_size], self.pad_token_id)
            for k in range(0, len(rows), self.micro_batch_size)
        ]

    def next_rows(self) -> list[dict]:
        """This process's rows of the next step, in stream order, each with its `position` in the stream."""
        share = self.micro_batch_size * self.gradient_accumulation_steps
        start = self.step * share * self.world_size + self.rank * share
        self.step += 1
        return [self.row_at(start + i) for i in range(share)]

    def row_at(self, position: int) -> dict:
        """The row at a position of the stream (a copy: the rows themselves are served again every epoch)."""
        return {**self.rows[self.index(position)], "position": position}

    def rows_until(self, max_steps: int) -> list[dict]:
        """Every row that steps [0, max_steps) will serve, on any process (e.g. to precompute something for them)."""
        positions = range(max_steps * self.micro_batch_size * self.gradient_accumulation_steps * self.world_size)
        return [self.rows[i] for i in sorted({self.index(p) for p in positions})]

    def index(self, position: int) -> int:
        epoch, i = divmod(position, len(self.rows))
        if epoch != self.epoch:
            self.epoch, self.order = epoch, self.epoch_order(epoch)
        return self.order[i]

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.rows), generator=generator).tolist()
        if not self.group_by_length:
            return order
        size = self.micro_batch_size * self.gradient_accumulation_steps * self.world_size  # one global batch
        grouped = []
        for start in range(0, len(order), 64 * size):
            window = sorted(order[start : start + 64 * size], key=lambda i: row_length(self.rows[i]))
            batches = [window[k : k + size] for k in range(0, len(window), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[b]
        return grouped

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]


def row_length(row: dict) -> int:
    return len(row["prompt_ids"]) + max(
        (len(row[f"{g}_response_ids"]) for g in GENERATIONS if f"{g}_response_ids" in row), default=0
    )


class OnlineBatchFactory:
    """Online batches, same interface as BatchFactory: the dataset's prompts only (in the same seeded stream) ->
    samples from the current policy -> the annotator -> the script's `label` -> the reweighter -> batches.

    num_generations 2 (pairs): annotator.prefer gives each pair a preference, the probability that generation1 is
    better (None where it failed), kept on the row as `preference`; num_generations 1: annotator.score gives each
    response a score (None where it failed). The script's `label(annotation)` turns one into the generations'
    rewards, a tuple (generation1_reward[, generation2_reward]), or None to drop the example: the script, not this
    class, decides what is trained on (e.g. dpo_pairwise.py drops ties and failures).

    samples_per_prompt k > 1 (groups, with num_generations 1): each prompt gets k scored samples, k rows that are
    kept or dropped together (one dropped sample drops its group) and stay adjacent: rows i*k .. i*k + k - 1 of a
    micro-batch share a prompt, and a row's group within the step is position // k.

    The contract that keeps FSDP's collectives in step: every call of `next_step()` returns exactly
    micro_batch_size * gradient_accumulation_steps examples on every process. When examples are dropped, more prompts
    are sampled, in rounds that all processes take together, each sized by the rate kept so far. If max_rounds
    are not enough (a policy so sure of itself that its samples tie), the step is filled with dropped examples at
    weight 0: they contribute nothing to the loss, and are counted as online/padded. A step on which no process kept
    anything is reported; max_untrainable_steps of them in a row stop the run, as does a step on which the annotator
    failed on every example (a round on which it failed on every example ends the rounds: a judge that is down or
    past its deadline costs one round, not max_rounds). Samples come from the policy as it is at this step
    (on-policy); extra kept examples are discarded.

    Sampling draws from a generator of this process's own, seeded with (seed, rank), so processes sample differently;
    its state is part of `state_dict()` with the prompt stream's position, so a resumed run samples what an
    uninterrupted one would. `stats` holds the counts of the latest step on this process (annotator counts under
    annotator/); `metrics(totals)` turns them, summed over processes, into the logged online/* metrics.
    """

    def __init__(
        self,
        prompt_records: list[dict],
        tokenizer,
        policy,
        annotator,
        *,
        num_generations: int,
        samples_per_prompt: int = 1,
        label,
        generation,
        max_prompt_length: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        seed: int,
        group_by_length: bool = True,
        reweighter=None,
        sample_reward=None,
        max_rounds: int = 8,
        max_untrainable_steps: int = 10,
    ):
        if num_generations not in (1, 2):
            fail(f"OnlineBatchFactory samples 1 (scored) or 2 (compared) responses per prompt, not {num_generations}")
        if samples_per_prompt > 1 and (num_generations != 1 or micro_batch_size % samples_per_prompt):
            fail(
                f"groups of {samples_per_prompt} samples per prompt need scored samples (num_generations 1) and a "
                f"micro-batch ({micro_batch_size}) that is a multiple of {samples_per_prompt}"
            )
        rows = tokenize_records(prompt_records, tokenizer, max_prompt_length + 1, max_prompt_length)
        for row, record in zip(rows, prompt_records):
            # the annotator gets the prompt as the data has it, not as our template renders it
            row["raw_prompt"] = record["prompt"]
        self.prompts = BatchFactory(  # a step of prompts: one per example, or per group of samples_per_prompt
            rows,
            pad_token_id=tokenizer.pad_token_id,
            micro_batch_size=micro_batch_size // samples_per_prompt,
            gradient_accumulation_steps=gradient_accumulation_steps,
            seed=seed,
            group_by_length=group_by_length,
        )
        self.tokenizer, self.policy, self.annotator, self.label = tokenizer, policy, annotator, label
        self.num_generations, self.generation, self.reweighter = num_generations, generation, reweighter
        self.samples_per_prompt = samples_per_prompt
        self.micro_batch_size, self.examples_per_step = micro_batch_size, micro_batch_size * gradient_accumulation_steps
        self.sample_reward, self.max_rounds = sample_reward, max_rounds
        self.max_untrainable_steps = max_untrainable_steps
        self.device = next(policy.parameters()).device
        # (seed, rank) -> this process's sampling stream; a single process draws what rank 0 of a torchrun draws
        self.generator = torch.Generator(self.device).manual_seed(seed * 1000 + dist.get_rank())
        self.keep_rate, self.untrainable_steps, self.stats, self.samples = 1.0, 0, Counter(), []

    def next_step(self) -> list[dict]:
        self.stats, annotator_before = Counter(), Counter(self.annotator.stats)
        k = self.samples_per_prompt
        kept, dropped = [], []  # groups (lists of k rows; one row each without groups)
        for _ in range(self.max_rounds):
            # every process takes the same rounds: the largest shortfall decides
            missing = all_reduce(self.examples_per_step - k * len(kept), op=dist.ReduceOp.MAX).item()
            if missing <= 0:
                break
            num_prompts = min(math.ceil(missing / k / max(self.keep_rate, 0.1)), 4 * self.examples_per_step // k)
            failed_before = self.stats["failed"]
            groups = self.sample(num_prompts)
            groups_kept = [group for group in groups if all(row["kept"] for row in group)]
            self.keep_rate = 0.5 * self.keep_rate + 0.5 * len(groups_kept) / num_prompts
            kept, dropped = kept + groups_kept, dropped + [g for g in groups if not all(row["kept"] for row in g)]
            # an annotator that failed on every example of a round (down, or past its deadline) is not asked again
            if all_reduce(self.stats["failed"] - failed_before == num_prompts * k).item() == dist.get_world_size():
                break
        annotator_counts = Counter(self.annotator.stats)
        annotator_counts.subtract(annotator_before)
        self.stats.update({f"annotator/{key}": count for key, count in annotator_counts.items()})
        self.stats["kept"] = k * len(kept)
        failed_everywhere, kept_anywhere = all_reduce(
            [self.stats["failed"] == self.stats["examples"], len(kept) > 0]
        ).tolist()
        if failed_everywhere == dist.get_world_size():  # every process decides together, or the others would hang
            fail(f"the annotator failed on every example of a step; annotator stats: {dict(self.annotator.stats)}")
        self.untrainable_steps = 0 if kept_anywhere else self.untrainable_steps + 1
        if self.untrainable_steps:
            print0(
                f"online: nothing to train on in this step ({self.untrainable_steps} in a row): no example was "
                f"labelled (this process: {self.stats['examples']} examples, {self.stats['ties']} ties, "
                f"{self.stats['failed']} failed)"
            )
            if self.untrainable_steps >= self.max_untrainable_steps:
                fail(
                    f"online: {self.untrainable_steps} steps in a row with nothing to train on: the annotator "
                    f"({type(self.annotator).__name__}) labelled no example ({self.stats['ties']} ties, "
                    f"{self.stats['failed']} failed of {self.stats['examples']} in the last step on this process); "
                    "check the annotator, or raise --generation.temperature so that samples differ"
                )
        kept = kept[: self.examples_per_step // k]
        if self.reweighter is not None:
            rows = self.reweighter([row for group in kept for row in group])
            kept = [rows[i : i + k] for i in range(0, len(rows), k)]
        if k * len(kept) < self.examples_per_step:  # still short: fill with dropped examples at weight 0
            self.stats["padded"] += self.examples_per_step - k * len(kept)
            kept += [
                [{**row, **{f"{g}_weight": 0.0 for g in GENERATIONS[: self.num_generations]}} for row in group]
                for group in dropped[: self.examples_per_step // k - len(kept)]
            ]
        kept = sorted(kept, key=lambda group: max(map(row_length, group)))  # grouped by length: less padding
        rows = [
            {**row, "position": dist.get_rank() * self.examples_per_step + i}
            for i, row in enumerate(row for group in kept for row in group)
        ]
        return [
            collate(rows[i : i + self.micro_batch_size], self.tokenizer.pad_token_id)
            for i in range(0, self.examples_per_step, self.micro_batch_size)
        ]

    def sample(self, num_prompts: int) -> list[list[dict]]:
        """Sample and annotate num_prompts prompts: for each, its group of samples_per_prompt rows (one row without
        groups) with the samples, the annotation, the script's label (the rewards) and `kept` (False where the
        label is None)."""
        prompt_rows = []
        while len(prompt_rows) < num_prompts:  # whole steps of the prompt stream, so its position stays a step count
            prompt_rows += self.prompts.next_rows()
        prompt_rows = prompt_rows[:num_prompts]
        n, k = self.num_generations, self.samples_per_prompt
        batch = collate(prompt_rows, self.tokenizer.pad_token_id)
        start = time.perf_counter()
        response_ids, response_mask = generate(  # prompt i's n * k samples at rows i*n*k .. (i + 1)*n*k - 1
            self.policy,
            batch["prompt_token_ids"].to(self.device),
            batch["prompt_attention_mask"].to(self.device),
            **vars(self.generation),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=self.generator,
            num_samples=n * k,
        )
        self.stats["generation_seconds"] += time.perf_counter() - start
        ids = [row[mask.bool()].tolist() for row, mask in zip(response_ids.cpu(), response_mask.cpu())]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        self.stats["generated_tokens"] += sum(map(len, ids))
        self.stats["responses"] += len(ids)
        self.stats["eos"] += sum(r[-1:] == [self.tokenizer.eos_token_id] for r in ids)
        if self.sample_reward is not None:
            self.stats["sample_reward"] += sum(
                self.sample_reward(batch["prompt"][i // (n * k)], t) for i, t in enumerate(texts)
            )
        raw_prompts = [r["raw_prompt"] for r in prompt_rows]
        if n == 2:
            annotations = self.annotator.prefer(raw_prompts, texts[0::2], texts[1::2])
            self.stats["ties"] += sum(a == 0.5 for a in annotations)
        else:
            annotations = self.annotator.score([p for p in raw_prompts for _ in range(k)], texts)
        self.stats["failed"] += sum(a is None for a in annotations)
        groups = []
        for i, prompt_row in enumerate(prompt_rows):
            group = []
            for j in range(i * k, (i + 1) * k):  # this prompt's rows: a pair (n 2) or one of its k samples each
                rewards = self.label(annotations[j])
                row = {
                    "prompt": prompt_row["prompt"],
                    "prompt_ids": prompt_row["prompt_ids"],
                    "kept": rewards is not None,
                }
                if n == 2:
                    row["preference"] = annotations[j]
                for m, g in enumerate(GENERATIONS[:n]):
                    row |= {
                        f"{g}_response_only": texts[j * n + m],
                        f"{g}_response_ids": ids[j * n + m],
                        f"{g}_reward": math.nan if rewards is None else rewards[m],
                        f"{g}_weight": 1.0,
                    }
                group.append(row)
            groups.append(group)
        self.stats["examples"] += len(annotations)
        self.samples = [
            (raw_prompts[i], texts[i * n * k : (i + 1) * n * k], annotations[i * k : (i + 1) * k])
            for i in range(min(3, len(groups)))
        ]
        return groups

    @staticmethod
    def metrics(totals: dict) -> dict:
        """online/* and annotator/* from `stats` summed over processes (common.distributed.sum_over_processes)."""
        responses, examples = max(totals.get("responses", 0), 1), max(totals.get("examples", 0), 1)
        metrics = {
            "online/response_length": totals.get("generated_tokens", 0) / responses,
            "online/eos_rate": totals.get("eos", 0) / responses,
            "online/kept_fraction": totals.get("kept", 0) / examples,
            "online/ties": totals.get("ties", 0) / examples,
            "online/failed": totals.get("failed", 0) / examples,
            "online/padded": totals.get("padded", 0),
            # all processes' tokens over one process's sampling time (processes sample in parallel)
            "online/generated_tokens_per_s": totals.get("generated_tokens", 0)
            * dist.get_world_size()
            / max(totals.get("generation_seconds", 0), 1e-9),
        }
        if "sample_reward" in totals:
            metrics["online/sample_reward"] = totals["sample_reward"] / responses
        return metrics | {key: value for key, value in totals.items() if key.startswith("annotator/")}

    def state_dict(self) -> dict:
        return {
            "prompts": self.prompts.state_dict(),
            "generator": self.generator.get_state(),
            "keep_rate": self.keep_rate,
            "untrainable_steps": self.untrainable_steps,
        }

    def load_state_dict(self, state: dict):
        self.prompts.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"])
        self.keep_rate, self.untrainable_steps = state["keep_rate"], state["untrainable_steps"]
