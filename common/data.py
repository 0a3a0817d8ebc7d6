"""Dataset loaders: any supported dataset -> a list of records for one setup kind.

A record is a dict: `prompt` (text, or a list of chat messages), `generation1` (response text) and, for
pairwise data, `generation2`; optionally `generation{1,2}_reward` and `generation{1,2}_weight`.
In pairwise records generation1 is the preferred response (reward 1.0, generation2 0.0).

Kinds: "sft" (prompt + one response), "pairwise" (prompt + preferred + other), "pointwise" (prompt +
response + reward 1.0 desirable / 0.0 undesirable), "prompt" (prompt only, for the online setups).
Pairwise data also serves sft (the preferred response), pointwise (each response with its label) and
prompt; pointwise data serves sft (its desirable rows) and prompt; every layout serves prompt.

Layouts, detected from the columns:
  hh            chosen, rejected: whole "\n\nHuman: ...\n\nAssistant: ..." dialogues (Anthropic/hh-rlhf),
                split at the last "\n\nAssistant:"; or chosen/rejected message lists with a shared prefix
  shp           history, human_ref_A, human_ref_B, labels, score_A, score_B (stanfordnlp/SHP);
                pairs whose score ratio is below 2 are dropped, as in the SteamSHP recipe
  pairwise      prompt, chosen, rejected (text, or messages as in ultrafeedback_binarized)
  pointwise     prompt, completion, label
  sft           prompt, completion; or messages (the last one is the assistant's response)
  prompt        prompt
A `weight` column, when present, sets the weight of every generation in its row.
Rows that cannot be used (empty response, identical chosen and rejected, ...) are skipped and counted.
"""

import os
from collections import Counter

import datasets

from common import toy
from common.distributed import fail, print0

BUILTIN = {  # name -> (hub id, {split: hub split})
    "hh": ("Anthropic/hh-rlhf", {"train": "train", "test": "test"}),
    "shp": ("stanfordnlp/SHP", {"train": "train", "test": "test"}),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs", "test": "test_prefs"}),
}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LAYOUTS = {  # layout -> the columns that identify it, tried in this order
    "shp": {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"},
    "pairwise": {"prompt", "chosen", "rejected"},
    "hh": {"chosen", "rejected"},
    "pointwise": {"prompt", "completion", "label"},
    "sft": {"prompt", "completion"},
    "messages": {"messages"},
    "prompt": {"prompt"},
}
KINDS = {  # kind -> layouts that can serve it
    "sft": {"shp", "pairwise", "hh", "pointwise", "sft", "messages"},
    "pairwise": {"shp", "pairwise", "hh"},
    "pointwise": {"shp", "pairwise", "hh", "pointwise"},
    "prompt": set(LAYOUTS),
}
HH_ASSISTANT = "\n\nAssistant:"


def load_records(dataset: str, split: str, kind: str) -> list[dict]:
    """Records of `kind` from a built-in name, a local .jsonl/.json/.parquet/.csv file or a hub id."""
    if dataset == "toy":
        return toy.records(split, kind)
    table = load_table(dataset, split)
    layout = next((name for name, columns in LAYOUTS.items() if columns <= set(table.column_names)), None)
    if layout is None:
        accepted = "; ".join(f"{name}: {', '.join(sorted(cols))}" for name, cols in LAYOUTS.items())
        fail(f"dataset '{dataset}' has columns {sorted(table.column_names)}, which match no known layout ({accepted})")
    if layout not in KINDS[kind]:
        fail(f"dataset '{dataset}' has the '{layout}' layout, which cannot serve {kind} training "
             f"(layouts that can: {', '.join(sorted(KINDS[kind]))})")
    skipped, records = Counter(), []
    for row in table:
        try:
            records.extend(to_records(parse_row(row, layout), kind))
        except SkipRow as skip:
            skipped[str(skip)] += 1
    for reason, count in skipped.items():
        print0(f"{dataset} [{split}]: skipped {count} rows: {reason}")
    print0(f"{dataset} [{split}]: {len(records)} {kind} records from {len(table)} rows ({layout} layout)")
    if not records:
        fail(f"dataset '{dataset}' [{split}] gave no usable {kind} records")
    return records


def load_eval_records(dataset: str, eval_dataset: str | None, eval_split: str, kind: str, limit: int) -> list[dict] | None:
    """Held-out records: `eval_dataset` when given, else --dataset's `eval_split` (toy, built-in or hub;
    a local file has no other split, so it gets no evaluation). At most `limit` records."""
    if eval_dataset is None and is_local(dataset):
        print0(f"no evaluation: {dataset} is a local file (pass --eval_dataset for held-out data)")
        return None
    records = load_records(eval_dataset or dataset, eval_split, kind)
    return records[:limit]


def is_local(dataset: str) -> bool:
    return os.path.splitext(dataset.removesuffix(".gz"))[1] in FILE_BUILDERS or os.path.exists(dataset)


def load_table(dataset: str, split: str) -> datasets.Dataset:
    if dataset in BUILTIN:
        hub_id, splits = BUILTIN[dataset]
        dataset, split = hub_id, splits.get(split, split)
    ext = os.path.splitext(dataset.removesuffix(".gz"))[1]
    if is_local(dataset):
        if not os.path.isfile(dataset):
            fail(f"dataset file '{dataset}' does not exist (give a .jsonl/.json/.parquet/.csv file, a hub id or one of: toy, {', '.join(BUILTIN)})")
        if ext not in FILE_BUILDERS:
            fail(f"dataset file '{dataset}' is not .jsonl, .json, .parquet or .csv (optionally .gz)")
        return datasets.load_dataset(FILE_BUILDERS[ext], data_files=dataset, split="train")
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all one line for the user
        fail(f"could not load dataset '{dataset}' split '{split}' from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason it is counted under."""


def parse_row(row: dict, layout: str) -> dict:
    """One row of any layout -> {prompt, chosen, rejected} or {prompt, completion, label} or {prompt, completion} or {prompt}."""
    weight = float(row["weight"]) if row.get("weight") is not None else 1.0
    if layout == "hh":
        if isinstance(row["chosen"], list):
            prompt, chosen = split_messages(row["chosen"])
            prompt_rejected, rejected = split_messages(row["rejected"])
        else:
            prompt, chosen = split_hh(row["chosen"])
            prompt_rejected, rejected = split_hh(row["rejected"])
        if prompt != prompt_rejected:
            raise SkipRow("chosen and rejected continue different prompts")
        return check_pair(dict(prompt=prompt, chosen=chosen, rejected=rejected, weight=weight))
    if layout == "shp":
        if max(row["score_A"], row["score_B"]) < 2 * min(row["score_A"], row["score_B"]):
            raise SkipRow("SHP score ratio below 2")
        a, b = row["human_ref_A"], row["human_ref_B"]
        chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
        return check_pair(dict(prompt=f"\n\nHuman: {row['history']}{HH_ASSISTANT}", chosen=" " + chosen, rejected=" " + rejected, weight=weight))
    if layout == "pairwise":
        prompt, chosen = response_of(row["prompt"], row["chosen"])
        prompt, rejected = response_of(row["prompt"], row["rejected"])
        return check_pair(dict(prompt=prompt, chosen=chosen, rejected=rejected, weight=weight))
    if layout in ("pointwise", "sft"):
        prompt, completion = response_of(row["prompt"], row["completion"])
        out = dict(prompt=prompt, completion=check_response(completion), weight=weight)
        if layout == "pointwise":
            if row["label"] is None:
                raise SkipRow("label is missing")
            out["label"] = bool(row["label"])
        return out
    if layout == "messages":
        prompt, completion = split_messages(row["messages"])
        return dict(prompt=prompt, completion=check_response(completion), weight=weight)
    if not row["prompt"]:
        raise SkipRow("empty prompt")
    return dict(prompt=row["prompt"], weight=weight)


def to_records(parsed: dict, kind: str) -> list[dict]:
    prompt, weight = parsed["prompt"], parsed["weight"]
    if kind == "prompt":
        return [dict(prompt=prompt)]
    if "chosen" in parsed:
        chosen, rejected = parsed["chosen"], parsed["rejected"]
        if kind == "sft":
            return [dict(prompt=prompt, generation1=chosen, generation1_weight=weight)]
        if kind == "pointwise":
            return [dict(prompt=prompt, generation1=response, generation1_reward=reward, generation1_weight=weight)
                    for response, reward in ((chosen, 1.0), (rejected, 0.0))]
        return [dict(prompt=prompt, generation1=chosen, generation2=rejected, generation1_reward=1.0,
                     generation2_reward=0.0, generation1_weight=weight, generation2_weight=weight)]
    record = dict(prompt=prompt, generation1=parsed["completion"], generation1_weight=weight)
    if kind == "sft":
        return [record] if parsed.get("label", True) else []
    return [dict(record, generation1_reward=float(parsed["label"]))]


def split_hh(dialogue: str) -> tuple[str, str]:
    """'...\n\nAssistant: reply' -> ('...\n\nAssistant:', ' reply')."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise SkipRow(f"dialogue has no '{HH_ASSISTANT.strip()}' turn")
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], check_response(dialogue[cut:])


def split_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """[..., {"role": "assistant", "content": reply}] -> ([...], reply)."""
    if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
        raise SkipRow("messages do not end with an assistant reply after a prompt")
    return messages[:-1], check_response(messages[-1]["content"])


def response_of(prompt, response) -> tuple:
    """The response text of a `chosen`/`completion` cell, which may be text, or messages that repeat the prompt."""
    if isinstance(response, list):
        if not isinstance(prompt, list):  # ultrafeedback: prompt text, chosen = [user turn, assistant turn]
            prompt_messages, response = split_messages(response)
            return prompt_messages, response
        if response and response[0].get("role") != "assistant":
            prompt, response = split_messages(response)
            return prompt, response
        if len(response) != 1:
            raise SkipRow("completion messages are not one assistant reply")
        response = response[0]["content"]
    if not prompt:
        raise SkipRow("empty prompt")
    return prompt, check_response(response)


def check_response(response) -> str:
    if not isinstance(response, str) or not response.strip():
        raise SkipRow("empty response")
    return response


def check_pair(pair: dict) -> dict:
    if pair["chosen"] == pair["rejected"]:
        raise SkipRow("chosen and rejected are identical")
    return pair
