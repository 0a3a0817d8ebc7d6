"""Data loaders: every layout -> records for every kind it can serve; bad rows skipped and counted."""

import json

import pytest

from common import toy
from common.data import load_records


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_hh_real_rows(hh_path, hh_rows, capsys):
    pairs = load_records(str(hh_path), "train", "pairwise")
    # every kept pair: prompt ends at the last assistant turn, the responses are what follows it
    # expected, worked out independently: split each dialogue at its last assistant turn; keep rows whose
    # chosen and rejected share the prompt and have non-empty replies
    split = lambda d: (d[: d.rindex("\n\nAssistant:") + 12], d[d.rindex("\n\nAssistant:") + 12 :])
    kept = [(split(r["chosen"]), split(r["rejected"])) for r in hh_rows]
    kept = [(c, r) for c, r in kept if c[0] == r[0] and c[1].strip() and r[1].strip()]
    assert len(kept) == len(pairs) == len(hh_rows) - 9
    for record, (chosen, rejected) in zip(pairs, kept):
        assert record["prompt"] == chosen[0] and record["prompt"].endswith("\n\nAssistant:")
        assert (record["generation1"], record["generation2"]) == (chosen[1], rejected[1])
        assert record["generation1_reward"] == 1.0 and record["generation2_reward"] == 0.0
    out = capsys.readouterr().out
    assert "skipped 4 rows: empty response" in out
    assert "skipped 5 rows: chosen and rejected continue different prompts" in out
    sft = load_records(str(hh_path), "train", "sft")
    assert [r["generation1"] for r in sft] == [r["generation1"] for r in pairs]
    pointwise = load_records(str(hh_path), "train", "pointwise")
    assert len(pointwise) == 2 * len(pairs) and [r["generation1_reward"] for r in pointwise[:2]] == [1.0, 0.0]
    prompts = load_records(str(hh_path), "train", "prompt")
    assert prompts[0] == {"prompt": pairs[0]["prompt"]}


def test_pairwise_text_and_messages(tmp_path):
    text = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Q1", "chosen": " good", "rejected": " bad", "weight": 2.0},
            {"prompt": "Q2", "chosen": " same", "rejected": " same"},  # identical: skipped
            {"prompt": "Q3", "chosen": "", "rejected": " bad"},  # empty response: skipped
        ],
    )
    records = load_records(text, "train", "pairwise")
    assert records == [
        dict(
            prompt="Q1",
            generation1=" good",
            generation2=" bad",
            generation1_reward=1.0,
            generation2_reward=0.0,
            generation1_weight=2.0,
            generation2_weight=2.0,
        )
    ]
    # ultrafeedback_binarized: prompt text, chosen/rejected = [user turn, assistant turn]
    user = {"role": "user", "content": "Q"}
    messages = write_jsonl(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt": "Q",
                "chosen": [user, {"role": "assistant", "content": "A"}],
                "rejected": [user, {"role": "assistant", "content": "B"}],
            }
        ],
    )
    record = load_records(messages, "train", "pairwise")[0]
    assert record["prompt"] == [user] and (record["generation1"], record["generation2"]) == ("A", "B")
    # chosen/rejected message lists with no prompt column: the shared prefix is the prompt
    implicit = write_jsonl(
        tmp_path / "implicit.jsonl",
        [
            {
                "chosen": [user, {"role": "assistant", "content": "A"}],
                "rejected": [user, {"role": "assistant", "content": "B"}],
            }
        ],
    )
    assert load_records(implicit, "train", "pairwise")[0]["prompt"] == [user]


def test_pointwise_sft_messages_prompt_layouts(tmp_path):
    pointwise = write_jsonl(
        tmp_path / "kto.jsonl",
        [{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": False}],
    )
    assert [r["generation1_reward"] for r in load_records(pointwise, "train", "pointwise")] == [1.0, 0.0]
    assert [r["generation1"] for r in load_records(pointwise, "train", "sft")] == ["A"]  # desirable rows only
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "completion": "A"}])
    assert load_records(sft, "train", "sft") == [dict(prompt="Q", generation1="A", generation1_weight=1.0)]
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": chat}])
    assert load_records(messages, "train", "sft") == [dict(prompt=chat[:1], generation1="A", generation1_weight=1.0)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Q1"}, {"prompt": "Q2"}])
    assert load_records(prompts, "train", "prompt") == [{"prompt": "Q1"}, {"prompt": "Q2"}]


def test_shp_layout_keeps_pairs_with_score_ratio_2(tmp_path):
    row = dict(history="H", human_ref_A="a", human_ref_B="b", labels=0, score_A=3, score_B=6)
    path = write_jsonl(tmp_path / "shp.jsonl", [row, dict(row, score_A=4)])  # ratio 2: kept; 1.5: dropped
    records = load_records(path, "train", "pairwise")
    assert len(records) == 1
    assert records[0]["prompt"] == "\n\nHuman: H\n\nAssistant:" and records[0]["generation1"] == " b"


def test_parquet_and_csv(tmp_path):
    import datasets

    table = datasets.Dataset.from_list([{"prompt": "Q", "completion": "A"}])
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    for path in ("d.parquet", "d.csv"):
        assert load_records(str(tmp_path / path), "train", "sft")[0]["generation1"] == "A"


def test_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: dataset file 'nope\.jsonl' does not exist"):
        load_records("nope.jsonl", "train", "sft")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(SystemExit) as e:
        load_records(odd, "train", "sft")
    message = str(e.value)
    assert "\n" not in message and "['answer', 'question']" in message and "sft: completion, prompt" in message
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q", "completion": "A"}])
    with pytest.raises(SystemExit, match="'sft' layout, which cannot serve pairwise"):
        load_records(sft, "train", "pairwise")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "Q", "completion": " "}])
    with pytest.raises(SystemExit, match="no usable sft records"):
        load_records(empty, "train", "sft")


def test_toy_task():
    train, test = toy.prompts("train"), toy.prompts("test")
    assert len(set(train)) == len(train) and not set(train) & set(test)
    assert toy.true_reward("dbca=", "abcd") == 1.0
    assert toy.true_reward("dbca=", "bacd") == 0.5  # two of four positions right
    assert toy.true_reward("dbca=", "abcdx") == 0.8  # extra letters count against it
    assert toy.true_reward("dbca=", "") == 0.0
    sft = toy.records("train", "sft")
    mean = sum(toy.true_reward(r["prompt"], r["generation1"]) for r in sft) / len(sft)
    assert abs(mean - 0.7625) < 0.01  # rho: 1 - E[1/L] for L uniform in 3..6
    for r in toy.records("test", "pairwise")[:100]:
        assert toy.true_reward(r["prompt"], r["generation1"]) > toy.true_reward(r["prompt"], r["generation2"])
    pointwise = toy.records("train", "pointwise")
    assert 0.45 < sum(r["generation1_reward"] for r in pointwise) / len(pointwise) < 0.55
