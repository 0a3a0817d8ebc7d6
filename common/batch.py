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
  generation1_reference_logps             (B,) float  sum of the response's log-probs under the reference
                                                      (only where precomputed: common/model.add_reference_logps)
generation1 and generation2 are padded to the same length T so they can be concatenated in one forward.

Tokenization: prompt and response are tokenized separately and concatenated, so the response tokens are
exactly the response's tokens; EOS is appended to every response that does not already end with it.
Too long: the prompt keeps its last max_prompt_length tokens (the latest turn), then the response is cut
to fit max_length (a cut response has no EOS). Chat prompts (lists of messages) go through the
tokenizer's chat template, which then owns the special tokens; text prompts get the tokenizer's own
(e.g. BOS).
"""

import torch
import torch.distributed as dist

from common.distributed import fail, print0

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
    for g in generations:
        ids, mask = pad([p + r[f"{g}_response_ids"] for p, r in zip(prompt_ids, rows)], pad_token_id, length=length)
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class BatchFactory:
    """Offline batches: a seeded stream of shuffled epochs over the token rows, cut into global batches.

    `next_step()` returns this rank's micro-batches for the next optimizer step. Step s covers stream
    positions [s * G, (s + 1) * G) with G = micro_batch_size * gradient_accumulation_steps * world_size;
    rank r takes the r-th contiguous share. So the examples of a step do not depend on how the global
    batch is split, and the data position is just the step count (saved in checkpoints). Within a rank's
    share, rows are sorted by length before being cut into micro-batches: less padding, same gradient.
    The online factory (policy samples + annotator) has the same interface.
    """

    def __init__(self, rows: list[dict], pad_token_id: int, micro_batch_size: int, gradient_accumulation_steps: int, seed: int):
        self.rows, self.pad_token_id, self.seed = rows, pad_token_id, seed
        self.micro_batch_size, self.gradient_accumulation_steps = micro_batch_size, gradient_accumulation_steps
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step, self.epoch, self.order = 0, None, None

    def next_step(self) -> list[dict]:
        share = self.micro_batch_size * self.gradient_accumulation_steps
        start = self.step * share * self.world_size + self.rank * share
        rows = sorted((self.rows[self.index(start + i)] for i in range(share)), key=row_length)
        self.step += 1
        return [collate(rows[k: k + self.micro_batch_size], self.pad_token_id) for k in range(0, share, self.micro_batch_size)]

    def rows_until(self, max_steps: int) -> list[dict]:
        """Every row that steps [0, max_steps) will serve, on any process (e.g. to precompute something for them)."""
        positions = range(max_steps * self.micro_batch_size * self.gradient_accumulation_steps * self.world_size)
        return [self.rows[i] for i in sorted({self.index(p) for p in positions})]

    def index(self, position: int) -> int:
        epoch, i = divmod(position, len(self.rows))
        if epoch != self.epoch:
            self.epoch, self.order = epoch, torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self.order[i])

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]


def row_length(row: dict) -> int:
    return len(row["prompt_ids"]) + max((len(row[f"{g}_response_ids"]) for g in GENERATIONS if f"{g}_response_ids" in row), default=0)
