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
Rows that cannot be used (empty or null prompt or response, identical chosen and rejected, ...) are
skipped and counted.

Cells that are wrong stop the load with a one-line error naming the dataset, the row (its 0-based index
in the table), the column and the value, rather than training on something silently wrong:
  weight        a finite number >= 0, or text that reads as one ("0.5": CSV reads a column with text in any
                row as all text, so the error names the row that is not a number); null means 1.0.
                Booleans are not weights.
  label         true/false, 1/0, 1.0/0.0, or one of LABEL_STRINGS in any case (true/false, yes/no, 1/0,
                desirable/undesirable); null skips the row.
  prompt, chosen, rejected, completion
                text, or a list of {"role": text, "content": text} messages; `messages` only the list;
                shp's history, human_ref_A, human_ref_B only text. Null counts as empty (skipped).
Local files that cannot be read (empty, not UTF-8, malformed JSON, not the format their extension says,
not gzip though named .gz) stop with one line naming the file, the line where known, and the expected
format. `datasets` caches a local file's table keyed by its path and modification time.
"""

import gzip
import json
import math
import os
from collections import Counter

from common import toy
from common.distributed import print0
from common.flags import fail

BUILTIN = {  # name -> (hub id, {split: hub split})
    "hh": ("Anthropic/hh-rlhf", {"train": "train", "test": "test"}),
    "shp": ("stanfordnlp/SHP", {"train": "train", "test": "test"}),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs", "test": "test_prefs"}),
}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_FORMATS = {  # extension -> what the file must hold, for error messages
    ".jsonl": "JSON lines (one JSON object per line, UTF-8)",
    ".json": "a JSON list of objects, or JSON lines (UTF-8)",
    ".parquet": "a Parquet table",
    ".csv": "CSV with a header line (UTF-8)",
}
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
LABEL_STRINGS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
LABEL_STRINGS |= {"desirable": True, "undesirable": False}  # pointwise label strings, compared in lower case
HH_ASSISTANT = "\n\nAssistant:"


def load_records(dataset: str, split: str, kind: str) -> list[dict]:
    """Records of `kind` from a built-in name, a local .jsonl/.json/.parquet/.csv file or a hub id."""
    if toy.is_toy(dataset):
        return toy.records(split, kind, shifted=dataset == "toy_shifted")
    table = load_table(dataset, split)
    layout = next((name for name, columns in LAYOUTS.items() if columns <= set(table.column_names)), None)
    if layout is None:
        accepted = "; ".join(f"{name}: {', '.join(sorted(cols))}" for name, cols in LAYOUTS.items())
        fail(f"dataset '{dataset}' has columns {sorted(table.column_names)}, which match no known layout ({accepted})")
    if layout not in KINDS[kind]:
        fail(
            f"dataset '{dataset}' has the '{layout}' layout, which cannot serve {kind} training "
            f"(layouts that can: {', '.join(sorted(KINDS[kind]))})"
        )
    skipped, records = Counter(), []
    for index, row in enumerate(table):
        try:
            records.extend(to_records(parse_row(row, layout), kind))
        except SkipRow as skip:
            skipped[str(skip)] += 1
        except BadCell as bad:
            fail(f"dataset '{dataset}' [{split}] row {index} (0-based): {bad}")
    for reason, count in skipped.items():
        print0(f"{dataset} [{split}]: skipped {count} rows: {reason}")
    print0(f"{dataset} [{split}]: {len(records)} {kind} records from {len(table)} rows ({layout} layout)")
    if not records:
        fail(f"dataset '{dataset}' [{split}] gave no usable {kind} records")
    return records


def load_eval_records(
    dataset: str, eval_dataset: str | None, eval_split: str, kind: str, limit: int
) -> list[dict] | None:
    """Held-out records: `eval_dataset` when given, else --dataset's `eval_split` (toy, built-in or hub;
    a local file has no other split, so it gets no evaluation). At most `limit` records."""
    if eval_dataset is None and is_local(dataset):
        print0(f"no evaluation: {dataset} is a local file (pass --eval_dataset for held-out data)")
        return None
    records = load_records(eval_dataset or dataset, eval_split, kind)
    return records[:limit]


def is_local(dataset: str) -> bool:
    return os.path.splitext(dataset.removesuffix(".gz"))[1] in FILE_BUILDERS or os.path.exists(dataset)


def load_table(dataset: str, split: str):
    """The rows of a built-in name, a hub id or a local file, as a datasets.Dataset."""
    import datasets  # here, not at the top: the toy task never needs it, and it takes most of a second to import

    if dataset in BUILTIN:
        hub_id, splits = BUILTIN[dataset]
        dataset, split = hub_id, splits.get(split, split)
    ext = os.path.splitext(dataset.removesuffix(".gz"))[1]
    if is_local(dataset):
        if not os.path.isfile(dataset):
            fail(
                f"dataset file '{dataset}' does not exist "
                f"(give a .jsonl/.json/.parquet/.csv file, a hub id or one of: toy, toy_shifted, {', '.join(BUILTIN)})"
            )
        if ext not in FILE_BUILDERS:
            fail(f"dataset file '{dataset}' is not .jsonl, .json, .parquet or .csv (optionally .gz)")
        return load_file(dataset, ext)
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all one line for the user
        fail(f"could not load dataset '{dataset}' split '{split}' from the hub ({one_line(e)})")


def load_file(path: str, ext: str):
    import datasets

    try:
        table = datasets.load_dataset(FILE_BUILDERS[ext], data_files=path, split="train")
        table.data.table.validate(full=True)  # arrow keeps invalid UTF-8 from JSON lines, to fail on reading the row
        return table
    except Exception as e:  # datasets raises tracebacks (StopIteration for an empty file): say what is wrong
        problem = file_problem(path, ext) or f"could not be read ({one_line(e.__cause__ or e)})"
        if problem == "is empty":
            fail(f"dataset file '{path}' is empty: give a file with one row per example")
        expected = FILE_FORMATS[ext] + (" compressed with gzip" if path.endswith(".gz") else "")
        fail(f"dataset file '{path}' {problem}: expected {expected}; fix the file, or rename it after its format")


def file_problem(path: str, ext: str) -> str | None:
    """What is wrong with a local file datasets could not load, or None if reading it ourselves finds nothing.
    Runs only after a failed load, so good files are read once."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except gzip.BadGzipFile:
        return "is not gzip-compressed, though its name ends in .gz"
    except (OSError, EOFError) as e:  # unreadable, or a truncated .gz
        return f"could not be read ({one_line(e)})"
    if not data.strip():
        return "is empty"
    if ext == ".parquet":
        return None if data[:4] == b"PAR1" else "is not a Parquet file"
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"is not UTF-8 text (line {number} has byte {line[e.start]:#04x} at column {e.start + 1})"
    if ext == ".csv":
        return "has a header line but no rows" if sum(bool(line.strip()) for line in lines) < 2 else None
    if ext == ".json" and data.lstrip().startswith(b"["):  # one JSON list rather than JSON lines
        try:
            items = json.loads(data)
        except json.JSONDecodeError as e:
            return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        bad = next((k for k, item in enumerate(items) if not isinstance(item, dict)), None)
        return None if bad is None else f"holds {show(items[bad])} as list item {bad}, not a JSON object"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"is not valid JSON lines (line {number}: {e.msg} at column {e.colno})"
        if not isinstance(row, dict):
            return f"holds {show(row)} on line {number}, not a JSON object"
    return None


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def show(value) -> str:
    """A cell for an error message: its type and repr, cut to ~80 characters."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason it is counted under."""


class BadCell(Exception):
    """A cell of the wrong type or value: the load stops (load_records names the row); the message says why."""


def parse_row(row: dict, layout: str) -> dict:
    """One row of any layout -> {prompt, chosen, rejected}, {prompt, completion[, label]} or {prompt}."""
    weight = weight_of(row.get("weight"))
    if layout == "hh":
        chosen, rejected = cell(row, "chosen"), cell(row, "rejected")
        if isinstance(chosen, list) or isinstance(rejected, list):
            prompt, chosen = split_messages(chosen)
            prompt_rejected, rejected = split_messages(rejected)
        else:
            prompt, chosen = split_hh(chosen)
            prompt_rejected, rejected = split_hh(rejected)
        if prompt != prompt_rejected:
            raise SkipRow("chosen and rejected continue different prompts")
        return check_pair(dict(prompt=prompt, chosen=chosen, rejected=rejected, weight=weight))
    if layout == "shp":
        if max(row["score_A"], row["score_B"]) < 2 * min(row["score_A"], row["score_B"]):
            raise SkipRow("SHP score ratio below 2")
        history, a, b = (cell(row, column, messages=False) for column in ("history", "human_ref_A", "human_ref_B"))
        chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
        chosen, rejected = " " + check_response(chosen), " " + check_response(rejected)
        return check_pair(
            dict(prompt=f"\n\nHuman: {history}{HH_ASSISTANT}", chosen=chosen, rejected=rejected, weight=weight)
        )
    if layout == "pairwise":
        prompt, chosen = response_of(cell(row, "prompt"), cell(row, "chosen"))
        prompt, rejected = response_of(cell(row, "prompt"), cell(row, "rejected"))
        return check_pair(dict(prompt=prompt, chosen=chosen, rejected=rejected, weight=weight))
    if layout in ("pointwise", "sft"):
        prompt, completion = response_of(cell(row, "prompt"), cell(row, "completion"))
        out = dict(prompt=prompt, completion=check_response(completion), weight=weight)
        if layout == "pointwise":
            if row["label"] is None:
                raise SkipRow("label is missing")
            out["label"] = label_of(row["label"])
        return out
    if layout == "messages":
        prompt, completion = split_messages(cell(row, "messages", text=False))
        return dict(prompt=prompt, completion=check_response(completion), weight=weight)
    prompt = cell(row, "prompt")
    if not prompt:
        raise SkipRow("empty prompt")
    return dict(prompt=prompt, weight=weight)


def cell(row: dict, column: str, text: bool = True, messages: bool = True):
    """row[column] if it is text or a list of {"role": text, "content": text} messages (as allowed); null -> ""."""
    value = row[column]
    if value is None:  # a missing cell is an empty one: its row is skipped and counted, not an error
        return ""
    if text and isinstance(value, str):
        return value
    allowed = "text or a list of messages" if text and messages else "text" if text else "a list of messages"
    if not (messages and isinstance(value, list)):
        raise BadCell(f"{column} is {show(value)}, not {allowed}; fix or drop the row")
    for k, message in enumerate(value):
        if not (isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))):
            raise BadCell(f"{column} message {k} is {show(message)}; a message is {{'role': text, 'content': text}}")
    return value


def weight_of(weight) -> float:
    """A `weight` cell as a float: a number >= 0 or its text; null is 1.0. NaN, inf and < 0 would train wrongly."""
    if weight is None:
        return 1.0
    number = weight
    if isinstance(weight, str):  # CSV gives a number column with text in some row as text: "0.5" is still 0.5
        try:
            number = float(weight)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise BadCell(f"weight is {show(weight)}; a weight must be a finite number >= 0 (or its text), or null for 1.0")
    return float(number)


def label_of(label) -> bool:
    """A pointwise `label` cell: True desirable, False undesirable (bool() would make the string "no" desirable)."""
    if isinstance(label, str) and label.strip().lower() in LABEL_STRINGS:
        return LABEL_STRINGS[label.strip().lower()]
    if isinstance(label, (bool, int, float)) and label in (0, 1):
        return bool(label)
    raise BadCell(
        f"label is {show(label)}; a label must be a boolean, 1/0, or (in any case) the text true/false, yes/no, 1/0 "
        "or desirable/undesirable; null skips the row"
    )


def to_records(parsed: dict, kind: str) -> list[dict]:
    prompt, weight = parsed["prompt"], parsed["weight"]
    if kind == "prompt":
        return [dict(prompt=prompt)]
    if "chosen" in parsed:
        chosen, rejected = parsed["chosen"], parsed["rejected"]
        if kind == "sft":
            return [dict(prompt=prompt, generation1=chosen, generation1_weight=weight)]
        if kind == "pointwise":
            return [
                dict(prompt=prompt, generation1=response, generation1_reward=reward, generation1_weight=weight)
                for response, reward in ((chosen, 1.0), (rejected, 0.0))
            ]
        return [
            dict(
                prompt=prompt,
                generation1=chosen,
                generation2=rejected,
                generation1_reward=1.0,
                generation2_reward=0.0,
                generation1_weight=weight,
                generation2_weight=weight,
            )
        ]
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
    if not isinstance(messages, list) or len(messages) < 2 or messages[-1]["role"] != "assistant":
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
