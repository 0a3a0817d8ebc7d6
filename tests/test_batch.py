"""Tokenization and the batch schema: response tokens are exactly the response (+EOS), prompts exactly the
prompt, truncation keeps the end of the prompt, and the BatchFactory's steps do not depend on the split."""

import pytest
import torch

from common.batch import BatchFactory, collate, tokenize_records
from common.data import load_records
from common.model import load_tokenizer

SCHEMA = {"prompt", "prompt_token_ids", "prompt_attention_mask", "trainable"} | {
    f"{g}{suffix}"
    for g in ("generation1", "generation2")
    for suffix in (
        "",
        "_response_only",
        "_token_ids",
        "_attention_mask",
        "_response_mask",
        "_response_token_ids",
        "_response_attention_mask",
        "_reward",
        "_weight",
    )
}


def test_real_hh_rows_split_exactly(hh_path, bpe_tokenizer):
    tok = bpe_tokenizer
    records = load_records(str(hh_path), "train", "pairwise")[:64]
    rows = tokenize_records(records, tok, max_length=4096, max_prompt_length=2048)
    batch = collate(rows, tok.pad_token_id)
    assert set(batch) == SCHEMA
    for i, record in enumerate(records):
        prompt_ids = batch["prompt_token_ids"][i][batch["prompt_attention_mask"][i].bool()]
        assert tok.decode(prompt_ids) == record["prompt"]
        for g in ("generation1", "generation2"):
            ids, mask = batch[f"{g}_token_ids"][i], batch[f"{g}_response_mask"][i]
            assert tok.decode(ids[mask]) == record[g] + tok.eos_token  # the response, then EOS
            assert ids[mask][-1] == tok.eos_token_id
            # prompt tokens + response tokens == the training sequence, with nothing in between
            real = ids[batch[f"{g}_attention_mask"][i].bool()]
            assert torch.equal(real, torch.cat([prompt_ids, ids[mask]]))
            # and the response alone, for running the prompt once for both generations
            response = batch[f"{g}_response_token_ids"][i][batch[f"{g}_response_attention_mask"][i].bool()]
            assert torch.equal(response, ids[mask])
            assert batch[g][i] == record["prompt"] + record[g]
    assert batch["generation1_token_ids"].shape == batch["generation2_token_ids"].shape
    assert batch["generation1_reward"].tolist() == [1.0] * 64 and batch["generation2_reward"].tolist() == [0.0] * 64


def test_truncation_keeps_end_of_prompt(hh_path, bpe_tokenizer):
    tok = bpe_tokenizer
    record = max(
        load_records(str(hh_path), "train", "sft")[:300], key=lambda r: len(r["prompt"]) + len(r["generation1"])
    )
    prompt_ids = tok(record["prompt"])["input_ids"]
    response_ids = tok(record["generation1"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(prompt_ids) > 64 and len(response_ids) > 32
    row = tokenize_records([record], tok, max_length=96, max_prompt_length=64)[0]
    assert row["prompt_ids"] == prompt_ids[-64:]  # the latest turn survives
    assert tok.decode(row["prompt_ids"]).endswith("\n\nAssistant:") and row["prompt"] == tok.decode(prompt_ids[-64:])
    assert row["generation1_response_ids"] == response_ids[:32]  # cut to fit 96, so no EOS
    with pytest.raises(SystemExit, match="max_prompt_length"):
        tokenize_records([record], tok, max_length=64, max_prompt_length=64)


def test_chat_template(bpe_tokenizer):
    tok = bpe_tokenizer
    records = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "generation1": "Hello!",
            "generation2": "Go away.",
        }
    ]
    row = tokenize_records(records, tok, max_length=256, max_prompt_length=128)[0]
    assert (
        row["prompt"]
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(row["prompt_ids"]) == row["prompt"]
    # the template closes the turn with <|im_end|>, which is EOS: the response ends there, EOS not doubled
    assert row["generation1_response_only"] == "Hello!<|im_end|>"
    assert tok.decode(row["generation1_response_ids"]) == "Hello!<|im_end|>"
    assert row["generation1_response_ids"].count(tok.eos_token_id) == 1
    assert tok.decode(row["generation2_response_ids"]) == "Go away.<|im_end|>"


def test_chat_data_without_template_is_a_clear_error():
    tok = load_tokenizer("toy")
    with pytest.raises(SystemExit, match="no chat template"):
        tokenize_records([{"prompt": [{"role": "user", "content": "hi"}], "generation1": "yo"}], tok, 64, 32)


def test_toy_rows_get_bos_and_eos():
    tok = load_tokenizer("toy")
    row = tokenize_records([{"prompt": "dcba=", "generation1": "abcd", "generation1_weight": 0.5}], tok, 64, 32)[0]
    assert row["prompt_ids"][0] == tok.bos_token_id and tok.decode(row["prompt_ids"][1:]) == "dcba="
    assert row["generation1_response_ids"] == tok("abcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate([row], tok.pad_token_id)
    assert batch["generation1_reward"] is None and batch["generation1_weight"].tolist() == [0.5]


def test_collate_padding():
    tok = load_tokenizer("toy")
    rows = tokenize_records(
        [{"prompt": "ab=", "generation1": "ab"}, {"prompt": "dcba=", "generation1": "abcd"}], tok, 64, 32
    )
    batch = collate(rows, tok.pad_token_id)
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]  # left-padded
    assert batch["generation1_attention_mask"].tolist() == [[1] * 7 + [0] * 4, [1] * 11]  # right-padded
    assert batch["generation1_response_mask"][0].tolist() == [False] * 4 + [True] * 3 + [False] * 4


def test_factory_steps_do_not_depend_on_split(world_of_one):
    tok = load_tokenizer("toy")
    rows = tokenize_records(
        [{"prompt": f"{c}=", "generation1": c * (i % 5 + 1)} for i, c in enumerate("abcdefghijklmnop")], tok, 64, 32
    )

    def step_prompts(micro, accum, world, steps=5):
        out = []
        for _ in range(steps):
            prompts = []
            for rank in range(world):
                factory = BatchFactory(
                    rows,
                    pad_token_id=tok.pad_token_id,
                    micro_batch_size=micro,
                    gradient_accumulation_steps=accum,
                    seed=3,
                )
                factory.rank, factory.world_size, factory.step = rank, world, len(out)
                prompts += [p for b in factory.next_step() for p in b["prompt"]]
            out.append(sorted(prompts))
        return out

    reference = step_prompts(6, 1, 1)
    assert step_prompts(3, 2, 1) == reference == step_prompts(3, 1, 2) == step_prompts(1, 3, 2)
    # each epoch (16 rows) is a permutation: steps 0-1 (positions 0-11) repeat no row, steps 0-2 cover them all
    assert len(set(reference[0] + reference[1])) == 12
    assert set(sum(reference[:3], [])) == {r["prompt"] for r in rows}
