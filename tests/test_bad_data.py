"""Bad data stops the load with one line naming the row (or file line) and the value; good data of the
same shapes still loads. Each bad table has good rows before the bad one, so the row number is checked."""

import gzip
import json
import os
import time

import datasets
import pytest

from common.data import load_records
from tests.conftest import run_script

SFT = [{"prompt": "Q", "completion": "A"}] * 2  # rows 0 and 1 are good; the bad row is row 2
POINTWISE = [{"prompt": "Q", "completion": "A", "label": True}] * 2
TEXT_LABELS = [{"prompt": "Q", "completion": "A", "label": "yes"}] * 2
PAIRWISE = [{"prompt": "Q", "chosen": "A", "rejected": "B"}] * 2
HH = [{"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}] * 2
SHP = [dict(history="H", human_ref_A="a", human_ref_B="b", labels=1, score_A=6, score_B=3)] * 2
CHAT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
GOOD_LINE = b'{"prompt": "Q", "completion": "A"}\n'


def bad_row(rows: list[dict], **cells) -> list[dict]:
    """`rows`, then a copy of their first row with `cells` changed."""
    return rows + [dict(rows[0], **cells)]


def write(path, content) -> str:
    """bytes as they are; a list of rows as JSON lines (.jsonl) or Parquet."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    else:
        datasets.Dataset.from_list(content).to_parquet(str(path))
    return str(path)


BAD = [  # (id, file name, content, kind, facts the one-line message must contain)
    ("weight-nan", "d.jsonl", bad_row(SFT, weight=float("nan")), "sft", ["row 2", "weight is float nan", ">= 0"]),
    ("weight-inf", "d.jsonl", bad_row(SFT, weight=float("inf")), "sft", ["row 2", "weight is float inf"]),
    ("weight-negative", "d.jsonl", bad_row(SFT, weight=-0.5), "sft", ["row 2", "weight is float -0.5"]),
    ("weight-text", "d.jsonl", bad_row(SFT, weight="1,5"), "sft", ["row 2", "weight is str '1,5'"]),
    ("weight-text-nan", "d.jsonl", bad_row(SFT, weight="nan"), "sft", ["row 2", "weight is str 'nan'"]),
    ("weight-bool", "d.jsonl", bad_row(SFT, weight=True), "sft", ["row 2", "weight is bool True"]),
    ("weight-csv-text", "d.csv", b"prompt,completion,weight\nQ,A,1\nQ,A,\nQ,A,heavy\n", "sft", ["row 2", "'heavy'"]),
    ("weight-long-cut", "d.jsonl", bad_row(SFT, weight="x" * 500), "sft", ["row 2", "weight is str 'xxx", "x..."]),
    ("label-maybe", "d.jsonl", bad_row(POINTWISE, label="maybe"), "pointwise", ["row 2", "str 'maybe'", "yes/no"]),
    ("label-2", "d.jsonl", bad_row(POINTWISE, label=2), "pointwise", ["row 2", "label is int 2"]),
    ("label-0.7", "d.jsonl", bad_row(POINTWISE, label=0.7), "pointwise", ["row 2", "label is float 0.7"]),
    ("label-list", "d.jsonl", bad_row(POINTWISE, label=[1]), "pointwise", ["row 2", "label is list [1]"]),
    ("label-parquet", "d.parquet", bad_row(TEXT_LABELS, label="good"), "pointwise", ["row 2", "label is str 'good'"]),
    ("prompt-number", "d.jsonl", bad_row(SFT, prompt=42), "sft", ["row 2", "prompt is int 42"]),
    ("completion-dict", "d.jsonl", bad_row(SFT, completion={"text": "A"}), "sft", ["row 2", "dict {'text': 'A'}"]),
    ("message-no-content", "d.jsonl", bad_row(SFT, prompt=[{"role": "user"}]), "sft", ["row 2", "prompt message 0"]),
    ("messages-text", "d.jsonl", bad_row([{"messages": CHAT}] * 2, messages="Q"), "sft", ["row 2", "list of messages"]),
    ("chosen-number", "d.jsonl", bad_row(PAIRWISE, chosen=1.5), "pairwise", ["row 2", "chosen is float 1.5"]),
    ("hh-dialogue-number", "d.jsonl", bad_row(HH, chosen=7), "pairwise", ["row 2", "chosen is int 7"]),
    ("shp-ref-list", "d.jsonl", bad_row(SHP, human_ref_A=["a"]), "pairwise", ["row 2", "human_ref_A is list ['a']"]),
    ("empty-file", "d.jsonl", b"", "sft", ["is empty"]),
    ("whitespace-file", "d.jsonl", b"\n  \n\n", "sft", ["is empty"]),
    ("empty-csv", "d.csv", b"", "sft", ["is empty"]),
    ("csv-header-only", "d.csv", b"prompt,completion\n", "sft", ["header line but no rows", "expected CSV"]),
    ("json-line-broken", "d.jsonl", GOOD_LINE * 2 + b'{"prompt": "Q", "completion"\n', "sft", ["line 3", "JSON lines"]),
    ("json-line-not-object", "d.jsonl", GOOD_LINE + b"[1, 2]\n", "sft", ["line 2", "list [1, 2]", "JSON object"]),
    (
        "json-list-broken",
        "d.json",
        b'[{"prompt": "Q", "completion": "A"},\n {"prompt": "Q" "completion": "A"}]',
        "sft",
        ["line 2"],
    ),
    ("jsonl-not-utf8", "d.jsonl", GOOD_LINE + b'{"prompt": "Q\xff", "completion": "A"}\n', "sft", ["line 2", "0xff"]),
    ("csv-not-utf8", "d.csv", b"prompt,completion\nQ,A\nQ\xe9,A\n", "sft", ["line 3", "not UTF-8", "0xe9"]),
    ("binary-named-jsonl", "d.jsonl", bytes(range(256)) * 4, "sft", ["not UTF-8", "expected JSON lines"]),
    ("csv-named-parquet", "d.parquet", b"prompt,completion\nQ,A\n", "sft", ["is not a Parquet file"]),
    ("plain-named-gz", "d.jsonl.gz", GOOD_LINE, "sft", ["is not gzip-compressed", "compressed with gzip"]),
]


@pytest.mark.parametrize("name, content, kind, facts", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_data_is_one_line(tmp_path, name, content, kind, facts):
    path = write(tmp_path / name, content)
    with pytest.raises(SystemExit) as e:
        load_records(path, "train", kind)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert path in message or f"'{path}'" in message
    for fact in facts:
        assert fact in message, (fact, message)


def test_label_strings_and_weights_accepted(tmp_path):
    labels = ["Yes", "no", " TRUE ", "0", "desirable", "Undesirable", 1, 0.0, True, "false"]
    rows = [{"prompt": "Q", "completion": "A", "label": label} for label in labels]
    records = load_records(write(tmp_path / "labels.jsonl", rows), "train", "pointwise")
    assert [r["generation1_reward"] for r in records] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    rows = [{"prompt": "Q", "completion": "A", "weight": w} for w in (0, None, 3, 0.25, " 2.5 ")]
    records = load_records(write(tmp_path / "weights.jsonl", rows), "train", "sft")
    assert [r["generation1_weight"] for r in records] == [0.0, 1.0, 3.0, 0.25, 2.5]
    csv = tmp_path / "weights.csv"  # a blank CSV cell is null: weight 1.0
    csv.write_text("prompt,completion,weight\nQ,A,\nQ,A,0.5\n")
    assert [r["generation1_weight"] for r in load_records(str(csv), "train", "sft")] == [1.0, 0.5]
    csv = tmp_path / "labels.csv"  # a text column: "0" is the label 0
    csv.write_text("prompt,completion,label\nQ,A,yes\nQ,A,0\n")
    assert [r["generation1_reward"] for r in load_records(str(csv), "train", "pointwise")] == [1.0, 0.0]


def test_null_cells_are_skipped_not_errors(tmp_path, capsys):
    rows = [
        {"prompt": "Q", "completion": "A"},
        {"prompt": None, "completion": "A"},
        {"prompt": "Q", "completion": None},
    ]
    assert len(load_records(write(tmp_path / "nulls.jsonl", rows), "train", "sft")) == 1
    out = capsys.readouterr().out
    assert "skipped 1 rows: empty prompt" in out and "skipped 1 rows: empty response" in out


def test_gzip_and_json_list_still_load(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD_LINE))
    assert load_records(str(path), "train", "sft")[0]["generation1"] == "A"
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "Q", "completion": "A"}]))
    assert load_records(str(path), "train", "sft")[0]["generation1"] == "A"


def test_no_stale_cache_across_fixes(tmp_path):
    """datasets caches a local file's table by path and mtime; a fixed or broken file must be read anew.
    (mtimes are set 10 s apart: writes within one clock tick would share an mtime, and so a cache entry.)"""
    path, bad, now = tmp_path / "d.jsonl", b'{"prompt": "Q",\n', time.time()
    for step, content in enumerate([bad, GOOD_LINE, bad, GOOD_LINE]):
        path.write_bytes(content)
        os.utime(path, (now + 10 * step, now + 10 * step))
        if content == bad:
            with pytest.raises(SystemExit, match="line 1"):
                load_records(str(path), "train", "sft")
        else:
            assert load_records(str(path), "train", "sft")[0]["generation1"] == "A"


def test_sft_script_fails_with_the_one_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", bad_row(SFT, weight=-1))
    proc = run_script("sft.py", "--dataset", bad, "--output_dir", str(tmp_path / "out"), check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset") and "row 2" in last and "weight is int -1" in last
