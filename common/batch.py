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
                                                      once for all its generations (common.model.shared_prompt_logps)
  generation1_reference_logps             (B,) float  sum of the response's log-probs under the reference
                                                      (only where precomputed: common/model.add_reference_logps)
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
        fail(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}) to leave room for the response")
    generations = [g for g in GENERATIONS if g in records[0]]
    texts = [render(record, generations, tokenizer) for record in records]  # (prompt text, [response texts])
    chat = [isinstance(record["prompt"], list) for record in records]
    prompt_ids = [None] * len(records)
    for is_chat in (True, False):
        rows = [i for i in range(len(records)) if chat[i] == is_chat]
        encoded = tokenizer([texts[i][0] for i in rows], add_special_tokens=not is_chat)["input_ids"] if rows else []
        for i, ids in zip(rows, encoded):
            prompt_ids[i] = ids
    responses = {g: tokenizer([t[1][k] for t in texts], add_special_tokens=False)["input_ids"] for k, g in enumerate(generations)}
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
        print0(f"truncated {cut_prompts} of {len(out)} prompts to their last {max_prompt_length} tokens and "
               f"{cut_responses} responses to fit max_length {max_length}")
    return out


def render(record: dict, generations: list[str], tokenizer) -> tuple[str, list[str]]:
    """(prompt text, response texts): the chat template's rendering for message prompts, else as is."""
    if not isinstance(record["prompt"], list):
        return record["prompt"], [record[g] for g in generations]
    if tokenizer.chat_template is None:
        fail("the dataset is conversational (lists of messages) but the tokenizer has no chat template: "
             "use a chat model's tokenizer, or set tokenizer.chat_template")
    prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    responses = []
    for g in generations:
        full = tokenizer.apply_chat_template(record["prompt"] + [{"role": "assistant", "content": record[g]}], tokenize=False)
        if not full.startswith(prompt):
            fail("the chat template renders prompt + response without the rendered prompt as its prefix; cannot split them")
        response = full[len(prompt):]
        if tokenizer.eos_token and tokenizer.eos_token in response:  # end the response at the template's end-of-turn EOS
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
    length = max((len(p) + len(r[f"{g}_response_ids"]) for p, r in zip(prompt_ids, rows) for g in generations), default=0)
    response_length = max((len(r[f"{g}_response_ids"]) for r in rows for g in generations), default=0)
    for g in generations:
        ids, mask = pad([p + r[f"{g}_response_ids"] for p, r in zip(prompt_ids, rows)], pad_token_id, length=length)
        batch[f"{g}_response_token_ids"], batch[f"{g}_response_attention_mask"] = pad(
            [r[f"{g}_response_ids"] for r in rows], pad_token_id, length=response_length)
        response_mask = torch.zeros_like(mask, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompt_ids, rows)):
            response_mask[i, len(p): len(p) + len(r[f"{g}_response_ids"])] = True
        rewards = [r[f"{g}_reward"] for r in rows]
        batch[g] = [r["prompt"] + r[f"{g}_response_only"] for r in rows]
        batch[f"{g}_response_only"] = [r[f"{g}_response_only"] for r in rows]
        batch[f"{g}_token_ids"], batch[f"{g}_attention_mask"], batch[f"{g}_response_mask"] = ids, mask, response_mask
        batch[f"{g}_reward"] = None if None in rewards else torch.tensor(rewards, dtype=torch.float)
        batch[f"{g}_weight"] = torch.tensor([r[f"{g}_weight"] for r in rows], dtype=torch.float)
        if f"{g}_reference_logps" in rows[0]:
            batch[f"{g}_reference_logps"] = torch.tensor([r[f"{g}_reference_logps"] for r in rows], dtype=torch.float)
    return batch


def interleave_responses(batch: dict, generations=GENERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The responses alone, (B * G, Tr) ids and attention mask, each row's G generations adjacent: the layout in
    which common.model.shared_prompt_logps runs each prompt once for all of them."""
    return tuple(torch.stack([batch[f"{g}_{key}"] for g in generations], 1).flatten(0, 1)
                 for key in ("response_token_ids", "response_attention_mask"))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shard_batches(rows: list[dict], pad_token_id: int, batch_size: int, device: torch.device) -> list[dict]:
    """This process's share of `rows`, as batches on `device`. Every process gets as many rows (the remainder
    of an uneven split is left out), so all run the same number of forwards: FSDP's are collectives."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share = rows[: len(rows) // world_size * world_size][rank::world_size]
    return [to_device(collate(share[i: i + batch_size], pad_token_id), device) for i in range(0, len(share), batch_size)]


class BatchFactory:
    """Offline batches: a seeded stream of shuffled epochs over the token rows, cut into global batches.

    `next_step()` returns this rank's micro-batches for the next optimizer step. Step s covers stream
    positions [s * G, (s + 1) * G) with G = micro_batch_size * gradient_accumulation_steps * world_size;
    rank r takes the r-th contiguous share. So the examples of a step do not depend on how the global
    batch is split, and the data position is just the step count (saved in checkpoints). Within a rank's
    share, rows are sorted by length before being cut into micro-batches: less padding, same gradient.
    A reweighter (common/reweight.py) sets the weights of each step's rows.
    The online factory (policy samples + annotator) has the same interface.
    """

    def __init__(self, rows: list[dict], pad_token_id: int, micro_batch_size: int, gradient_accumulation_steps: int, seed: int,
                 group_by_length: bool = True, reweighter=None):
        self.rows, self.pad_token_id, self.seed, self.group_by_length = rows, pad_token_id, seed, group_by_length
        self.reweighter = reweighter
        self.micro_batch_size, self.gradient_accumulation_steps = micro_batch_size, gradient_accumulation_steps
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step, self.epoch, self.order = 0, None, None

    def next_step(self) -> list[dict]:
        rows = self.next_rows() if self.reweighter is None else self.reweighter(self.next_rows())
        rows = sorted(rows, key=row_length)
        return [collate(rows[k: k + self.micro_batch_size], self.pad_token_id) for k in range(0, len(rows), self.micro_batch_size)]

    def next_rows(self) -> list[dict]:
        """This process's rows of the next step, in stream order."""
        share = self.micro_batch_size * self.gradient_accumulation_steps
        start = self.step * share * self.world_size + self.rank * share
        self.step += 1
        return [self.rows[self.index(start + i)] for i in range(share)]

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
            window = sorted(order[start: start + 64 * size], key=lambda i: row_length(self.rows[i]))
            batches = [window[k: k + size] for k in range(0, len(window), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[b]
        return grouped

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]


def row_length(row: dict) -> int:
    return len(row["prompt_ids"]) + max((len(row[f"{g}_response_ids"]) for g in GENERATIONS if f"{g}_response_ids" in row), default=0)


class OnlineBatchFactory:
    """Online batches, same interface as BatchFactory: the dataset's prompts only (in the same seeded
    stream) -> samples from the current policy -> annotator -> batch.

    pairwise (two samples per prompt): annotator.prefer gives generation1_reward 1.0 if generation1 is
    preferred, else 0.0 (generation2_reward the opposite); ties and failed verdicts are dropped and counted.
    pointwise (one sample): annotator.score gives generation1_reward; failed scores are dropped and counted.
    Then the reweighter, if any (common/reweight.py), sets the kept examples' weights; pairwise rows carry the
    annotator's verdict as `preference` for it.
    Every step is filled with exactly micro_batch_size * gradient_accumulation_steps kept examples on each
    process (FSDP needs every process to run the same number of forwards): when examples are dropped,
    more prompts are sampled, in rounds all processes take together, each sized by the rate kept so far.
    If max_rounds are not enough (a policy so sure of itself that its two samples tie), the step is filled
    with dropped examples at weight 0: they carry no preference, and contribute nothing to the loss.
    A step on which the annotator failed on every example stops the run with its stats.
    Samples come from the policy as it is at this step (on-policy); extra kept examples are discarded.
    `metrics()` returns what happened since the last call, for the log.
    """

    def __init__(self, prompt_records: list[dict], tokenizer, policy, annotator, pairwise: bool, max_prompt_length: int,
                 max_new_tokens: int, temperature: float, top_p: float, micro_batch_size: int,
                 gradient_accumulation_steps: int, seed: int, sample_reward=None, max_rounds: int = 8, group_by_length: bool = True,
                 reweighter=None):
        rows = tokenize_records(prompt_records, tokenizer, max_prompt_length + 1, max_prompt_length)
        for row, record in zip(rows, prompt_records):
            row["raw_prompt"] = record["prompt"]  # the annotator gets the prompt as the data has it, not as our template renders it
        self.prompts = BatchFactory(rows, tokenizer.pad_token_id, micro_batch_size, gradient_accumulation_steps, seed, group_by_length)
        self.tokenizer, self.policy, self.annotator, self.pairwise = tokenizer, policy, annotator, pairwise
        self.max_new_tokens, self.temperature, self.top_p, self.max_rounds = max_new_tokens, temperature, top_p, max_rounds
        self.micro_batch_size, self.sample_reward, self.reweighter = micro_batch_size, sample_reward, reweighter
        self.need = micro_batch_size * gradient_accumulation_steps
        self.keep_rate, self.stats, self.samples = 1.0, Counter(), []

    def next_step(self) -> list[dict]:
        device = next(self.policy.parameters()).device
        kept, dropped, failed = [], [], 0
        for _ in range(self.max_rounds):
            missing = all_reduce(self.need - len(kept), op=dist.ReduceOp.MAX).item()  # the same number of rounds everywhere
            if missing <= 0:
                break
            num_prompts = min(math.ceil(missing / max(self.keep_rate, 0.1)), 4 * self.need)
            rows, rows_dropped, rows_failed = self.sample(num_prompts, device)
            self.keep_rate = 0.5 * self.keep_rate + 0.5 * len(rows) / num_prompts
            kept, dropped, failed = kept + rows, dropped + rows_dropped, failed + rows_failed
        if all_reduce(failed < len(kept) + len(dropped), op=dist.ReduceOp.MIN).item() == 0:  # together, or the others would hang
            fail(f"the annotator failed on every example of a step; annotator stats: {dict(self.annotator.stats)}")
        kept = kept[: self.need]
        if self.reweighter is not None:
            kept = self.reweighter(kept)
        if len(kept) < self.need:  # still short (a policy so sure that its samples tie): pad with dropped rows at weight 0
            self.stats["padded"] += self.need - len(kept)
            kept += dropped[: self.need - len(kept)]
        kept = sorted(kept, key=row_length)  # grouped by length: less padding
        return [collate(kept[k: k + self.micro_batch_size], self.tokenizer.pad_token_id) for k in range(0, self.need, self.micro_batch_size)]

    def sample(self, num_prompts: int, device) -> tuple[list[dict], list[dict], int]:
        """Sample and annotate num_prompts prompts: (kept rows, dropped rows at weight 0, number failed)."""
        prompt_rows = []
        while len(prompt_rows) < num_prompts:  # whole steps of the prompt stream, so its position stays a step count
            prompt_rows += self.prompts.next_rows()
        prompt_rows = prompt_rows[:num_prompts]
        num_generations = 2 if self.pairwise else 1
        batch = collate(prompt_rows, self.tokenizer.pad_token_id)
        start = time.perf_counter()
        response_ids, response_mask, _ = generate(  # prompt i's samples at rows i*n .. i*n + n - 1
            self.policy, batch["prompt_token_ids"].to(device), batch["prompt_attention_mask"].to(device), self.max_new_tokens,
            self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.temperature, self.top_p, num_samples=num_generations)
        self.stats["generation_seconds"] += time.perf_counter() - start
        ids = [row[mask.bool()].tolist() for row, mask in zip(response_ids.cpu(), response_mask.cpu())]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        self.stats["generated_tokens"] += sum(map(len, ids))
        self.stats["responses"] += len(ids)
        self.stats["eos"] += sum(r[-1:] == [self.tokenizer.eos_token_id] for r in ids)
        if self.sample_reward is not None:
            self.stats["sample_reward"] += sum(self.sample_reward(batch["prompt"][n // num_generations], t) for n, t in enumerate(texts))
        raw_prompts = [r["raw_prompt"] for r in prompt_rows]
        if self.pairwise:
            verdicts = self.annotator.prefer(raw_prompts, texts[0::2], texts[1::2])
            rewards = [None if v is None or v == 0.5 else [float(v > 0.5), float(v < 0.5)] for v in verdicts]
            self.stats["ties"] += sum(v == 0.5 for v in verdicts)
        else:
            rewards = [None if s is None else [s] for s in self.annotator.score(raw_prompts, texts)]
        failed = sum(v is None for v in (verdicts if self.pairwise else rewards))
        self.stats["failed"] += failed
        kept, dropped = [], []
        for i, (row, reward) in enumerate(zip(prompt_rows, rewards)):
            out = {"prompt": row["prompt"], "prompt_ids": row["prompt_ids"]}
            if self.pairwise:  # the annotator's probability that generation1 is better (for reweighting)
                out["preference"] = verdicts[i]
            for k, g in enumerate(GENERATIONS[:num_generations]):
                n = i * num_generations + k
                out |= {f"{g}_response_only": texts[n], f"{g}_response_ids": ids[n],
                        f"{g}_reward": 0.5 if reward is None else reward[k], f"{g}_weight": 0.0 if reward is None else 1.0}
            (dropped if reward is None else kept).append(out)
        self.stats["examples"] += len(prompt_rows)
        self.stats["kept"] += len(kept)
        self.samples = [(raw_prompts[i], texts[i * num_generations: (i + 1) * num_generations], rewards[i]) for i in range(min(3, len(prompt_rows)))]
        return kept, dropped, failed

    def metrics(self) -> dict:
        """Means over all processes since the last call, under online/."""
        keys = ["responses", "generated_tokens", "eos", "examples", "kept", "ties", "failed", "padded", "generation_seconds", "sample_reward"]
        totals = dict(zip(keys, all_reduce([float(self.stats[k]) for k in keys]).tolist()))
        self.stats.clear()
        responses, examples = max(totals["responses"], 1), max(totals["examples"], 1)
        metrics = {
            "online/response_length": totals["generated_tokens"] / responses, "online/eos_rate": totals["eos"] / responses,
            "online/kept_fraction": totals["kept"] / examples, "online/ties": totals["ties"] / examples,
            "online/failed": totals["failed"] / examples, "online/padded": totals["padded"],
            # all processes' tokens over one process's sampling time (processes sample in parallel)
            "online/generated_tokens_per_s": totals["generated_tokens"] * dist.get_world_size() / max(totals["generation_seconds"], 1e-9),
        }
        if self.sample_reward is not None:
            metrics["online/sample_reward"] = totals["sample_reward"] / responses
        return metrics

    def state_dict(self) -> dict:
        return self.prompts.state_dict()

    def load_state_dict(self, state: dict):
        self.prompts.load_state_dict(state)
