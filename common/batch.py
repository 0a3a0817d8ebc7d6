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
  position                                (B,) long   where each example sits in the step: offline its position
                                                      in the data stream, online a number unique within the step
  index                                   (B,) long   offline: the example's row in its dataset (the key of what a
                                                      script precomputes for it, e.g. the reference's log-probs)
  trainable                               (B,) bool   False for the examples that only fill an online step (every
                                                      loss and diagnostic leaves them out; their weights are 0 too)
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

import torch
import torch.distributed as dist

from common.data import load_eval_records
from common.distributed import print0
from common.flags import fail

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
    for key in ("position", "index"):
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows])
    batch["trainable"] = torch.tensor([r.get("trainable", True) for r in rows])
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


def micro_batches(rows: list[dict], size: int, pad_token_id: int) -> list[dict]:
    """Rows, in their order, cut into batches of `size`."""
    return [collate(rows[i : i + size], pad_token_id) for i in range(0, len(rows), size)]


def training_tokens(batches: list[dict]) -> int:
    """The tokens of the trainable sequences of a step's batches, prompt and response each (a pair is two sequences,
    its prompt counted in both, however the forward shares it): what train/tokens_per_s counts in every script."""
    tokens = 0
    for batch in batches:
        for g in GENERATIONS:
            if f"{g}_attention_mask" in batch:
                tokens += int((batch[f"{g}_attention_mask"].sum(-1) * batch["trainable"]).sum())
    return tokens


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shard_batches(rows: list[dict], pad_token_id: int, batch_size: int, device: torch.device) -> list[dict]:
    """This process's share of `rows`, as batches on `device`, each row's `index` its place in `rows`. Every process
    gets as many rows (the remainder of an uneven split is left out), so all run the same number of forwards: FSDP's
    are collectives."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = [{**row, "index": i} for i, row in enumerate(rows)]
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
    A reweighter (common/reweight.py) multiplies the weights of each step's rows. Each row carries its `position` in
    the stream and its `index` in `rows`. (Online, common.online.OnlineSampler samples a step's rows instead.)
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
        return micro_batches(sorted(rows, key=row_length), self.micro_batch_size, self.pad_token_id)

    def next_rows(self) -> list[dict]:
        """This process's rows of the next step, in stream order, each with its `position` in the stream."""
        share = self.micro_batch_size * self.gradient_accumulation_steps
        start = self.step * share * self.world_size + self.rank * share
        self.step += 1
        return [self.row_at(start + i) for i in range(share)]

    def row_at(self, position: int) -> dict:
        """The row at a position of the stream (a copy: the rows themselves are served again every epoch)."""
        index = self.index(position)
        return {**self.rows[index], "position": position, "index": index}

    def indices_until(self, max_steps: int) -> list[int]:
        """The index of every row that steps [0, max_steps) will serve, on any process (to precompute something for
        them), in order."""
        positions = range(max_steps * self.micro_batch_size * self.gradient_accumulation_steps * self.world_size)
        return sorted({self.index(p) for p in positions})

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


def offline_data(args, records: list[dict], kind: str, tokenizer, reweighter=None) -> tuple[BatchFactory, list[dict]]:
    """A script's offline data: the BatchFactory over the dataset's records, and the held-out rows (--num_eval_examples
    `kind` records of --eval_dataset, or of --dataset's --eval_split), both tokenized by --max_length and
    --max_prompt_length (the flags these scripts share, read by name)."""
    factory = BatchFactory(
        tokenize_records(records, tokenizer, args.max_length, args.max_prompt_length),
        pad_token_id=tokenizer.pad_token_id,
        micro_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        group_by_length=args.group_by_length,
        reweighter=reweighter,
    )
    eval_records = load_eval_records(args.dataset, args.eval_dataset, args.eval_split, kind, args.num_eval_examples)
    eval_rows = (
        tokenize_records(eval_records, tokenizer, args.max_length, args.max_prompt_length) if eval_records else []
    )
    return factory, eval_rows
