"""The held-out generation eval (common/evaluation.py): win rate against the initial policy, kept across resume;
eval/kl; judges asked only where the responses differ; and the scripts logging it on a non-toy dataset."""

import json

import pytest
import torch

from common import toy
from common.annotators import Annotator, ToyAnnotator
from common.batch import collate
from common.evaluation import HeldOutEval
from common.generation import generate
from common.logps import response_logps
from common.model import load_causal_lm, load_tokenizer
from conftest import read_metrics, run_script

CPU = torch.device("cpu")
PROMPTS = [{"prompt": p} for p in toy.prompts("test")[:48]]


def without_speed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "per_s" not in k}


def held_out(tokenizer, annotator, output_dir, prompts=PROMPTS, **overrides) -> HeldOutEval:
    options = dict(
        max_prompt_length=32,
        max_new_tokens=16,
        temperature=1.0,
        batch_size=16,
        forward_batch_size=16,
        seed=3,
        output_dir=str(output_dir),
        true_reward=toy.true_reward,
    )
    return HeldOutEval(prompts, tokenizer, annotator, **(options | overrides))


@pytest.fixture(scope="module")
def models(sft_model, world_of_one):
    """The SFT model (the initial policy) and the random toy model (a far worse one), with the toy tokenizer."""
    tokenizer = load_tokenizer(str(sft_model))
    return load_causal_lm(str(sft_model), tokenizer, CPU), load_causal_lm("toy", tokenizer, CPU), tokenizer


def test_win_rate_against_the_initial_policy_kept_across_resume(models, tmp_path):
    """At step 0 the policy is the initial policy: the same samples, every pair a tie, win rate 1/2 exactly; the same
    weights evaluated again give the same numbers. A worse policy loses, by the comparison of true rewards (the toy
    annotator prefers the higher score) with the initial responses' stored scores; a run resumed later reads those
    responses from output_dir, and a run with other held-out prompts is told in one line."""
    sft, random_model, tokenizer = models
    evaluator = held_out(tokenizer, ToyAnnotator(), tmp_path)
    first, table = evaluator(0, sft, reference=sft), evaluator.table
    assert first["eval/win_rate"] == 0.5 and first["eval/kl"] == pytest.approx(0, abs=1e-5)
    assert 0.6 < first["eval/reward"] < 0.9 and "eval/score" not in first  # on toy the toy score is eval/reward
    assert all(row["verdict"] == 0.5 and row["response"] == row["initial_response"] for row in table)
    initial = [json.loads(line) for line in open(tmp_path / "eval_initial.jsonl")]
    assert [line["prompt"] for line in initial] == [p["prompt"] for p in PROMPTS]
    again = evaluator(7, sft)
    assert without_speed(again) == {k: v for k, v in without_speed(first).items() if k != "eval/kl"}

    worse, table = evaluator(8, random_model), evaluator.table
    responses = [row["response"] for row in table]
    assert all(row["initial_response"] == line["response"] for row, line in zip(table, initial))
    expected = []
    for prompt, line, response in zip(PROMPTS, initial, evaluator.responses):
        score = toy.true_reward(prompt["prompt"], response)
        expected.append(0.5 if score == line["score"] else float(score > line["score"]))
    assert worse["eval/win_rate"] == pytest.approx(sum(expected) / len(expected)) and worse["eval/win_rate"] < 0.2
    assert responses == evaluator.responses[: len(responses)]

    resumed = held_out(tokenizer, ToyAnnotator(), tmp_path)(8, random_model)
    assert without_speed(resumed) == without_speed(worse)
    with pytest.raises(SystemExit, match="initial responses to other held-out prompts") as e:
        held_out(tokenizer, ToyAnnotator(), tmp_path, prompts=PROMPTS[:16])(8, random_model)
    assert "\n" not in str(e.value)


def test_kl_is_the_mean_sequence_log_ratio(models, tmp_path):
    """eval/kl = mean over prompts of sum_t [log pi(y_t|x, y_<t) - log ref(y_t|x, y_<t)] of the policy's samples,
    checked against full-sequence forwards (common.logps.response_logps) of the same samples, drawn again with the
    evaluation's seed and batches; the forward batch size does not change it."""
    sft, random_model, tokenizer = models
    evaluator = held_out(tokenizer, None, tmp_path, forward_batch_size=5)
    kl = evaluator(0, sft, reference=random_model)["eval/kl"]
    generator, log_ratios = torch.Generator().manual_seed(3), []
    for first in range(0, len(PROMPTS), 16):
        rows = evaluator.rows[first : first + 16]
        batch = collate(rows, tokenizer.pad_token_id)
        response_ids, response_mask = generate(
            sft,
            batch["prompt_token_ids"],
            batch["prompt_attention_mask"],
            max_new_tokens=16,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
        for prompt_ids, response, mask in zip([r["prompt_ids"] for r in rows], response_ids, response_mask):
            ids = torch.tensor([prompt_ids + response[mask.bool()].tolist()])
            is_response = torch.zeros_like(ids, dtype=torch.bool)
            is_response[0, len(prompt_ids) :] = True
            with torch.no_grad():
                policy_logps = response_logps(sft, ids, torch.ones_like(ids), is_response)[0].sum()
                reference_logps = response_logps(random_model, ids, torch.ones_like(ids), is_response)[0].sum()
            log_ratios.append((policy_logps - reference_logps).item())
    assert kl == pytest.approx(sum(log_ratios) / len(log_ratios), rel=1e-5) and kl > 1


class LengthJudge(Annotator):
    """A pairwise judge stand-in: prefers the longer response (a probability, 0.8), fails on a response with a 'q'."""

    pairwise = True

    def __init__(self):
        super().__init__()
        self.asked = []

    def _score(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def _prefer(self, prompts, responses1, responses2):
        self.asked += list(zip(responses1, responses2))
        return [
            None if "q" in a + b else 0.5 if len(a) == len(b) else 0.8 if len(a) > len(b) else 0.2
            for a, b in zip(responses1, responses2)
        ]


def test_a_judge_is_asked_only_where_the_responses_differ(models, tmp_path):
    """Judges answer with their own pairwise form, the policy's response first; a probability counts as the
    verdict it leans to (0.8 a win); identical responses are ties that cost no request; failures are dropped from
    the win rate and counted in eval/failed."""
    sft, random_model, tokenizer = models
    judge = LengthJudge()
    evaluator = held_out(tokenizer, judge, tmp_path)
    assert evaluator(0, sft)["eval/win_rate"] == 0.5 and judge.asked == []
    metrics = evaluator(1, random_model)
    initial = [json.loads(line)["response"] for line in open(tmp_path / "eval_initial.jsonl")]
    pairs = list(zip(evaluator.responses, initial))
    assert judge.asked == [(a, b) for a, b in pairs if a != b] and judge.asked
    wins = [0.5 if a == b else float(len(a) > len(b)) for a, b in pairs if a == b or "q" not in a + b]
    failed = sum(a != b and "q" in a + b for a, b in pairs)
    assert metrics["eval/win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert metrics["eval/failed"] == pytest.approx(failed / (len(pairs) + len(judge.asked))) and failed > 0
    assert metrics["eval/score"] == pytest.approx(sum(map(len, evaluator.responses)) / len(pairs))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, bpe_tokenizer, hh_rows):
    """A non-toy setting: a tiny Llama with the byte-level BPE and its ChatML template, HH conversations as message
    lists (prompt: the first human turn; completion: the chosen reply), and a python-function annotator."""
    from common.data import split_hh

    folder = tmp_path_factory.mktemp("chat")
    load_causal_lm("toy", bpe_tokenizer, CPU).save_pretrained(folder / "model")
    bpe_tokenizer.save_pretrained(folder / "model")
    with open(folder / "chat.jsonl", "w") as f:
        for row in hh_rows[:64]:
            prompt, reply = split_hh(row["chosen"])
            first_turn = prompt.split("\n\nAssistant:")[0].removeprefix("\n\nHuman: ")
            record = {"prompt": [{"role": "user", "content": first_turn[:200]}], "completion": reply[:200]}
            f.write(json.dumps(record) + "\n")
    (folder / "eval_rewards.py").write_text(
        "def words(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
    )
    flags = ["--model_name_or_path", str(folder / "model"), "--dataset", str(folder / "chat.jsonl")]
    flags += ["--eval_dataset", str(folder / "chat.jsonl"), "--eval.num_prompts", "12", "--eval_every", "2"]
    flags += ["--max_steps", "2", "--max_length", "128", "--max_prompt_length", "64", "--per_device_batch_size", "4"]
    flags += ["--generation.max_new_tokens", "12", "--log_every", "1", "--warmup_steps", "0"]
    return folder, flags, {"PYTHONPATH": str(folder)}


def assert_logged_held_out_eval(output_dir):
    metrics = [m for m in read_metrics(output_dir) if "eval/win_rate" in m]
    assert [m["step"] for m in metrics] == [0, 2], metrics
    assert metrics[0]["eval/win_rate"] == 0.5 and all(m["eval/score"] > 0 for m in metrics)
    assert all(0 <= m["eval/eos_rate"] <= 1 and 0 < m["eval/response_length"] <= 12 for m in metrics)
    rows = [json.loads(line) for line in open(output_dir / "eval_samples.jsonl")]
    assert rows and "User: " in rows[0]["prompt"] and {r["step"] for r in rows} == {0, 2}


def test_sft_logs_score_and_win_rate_on_a_chat_dataset(chat_run, tmp_path):
    folder, flags, env = chat_run
    run_script(
        "sft.py", *flags, "--eval.annotator", "python:eval_rewards:words", "--output_dir", str(tmp_path), env=env
    )
    assert_logged_held_out_eval(tmp_path)


def test_online_dpo_under_torchrun_logs_score_win_rate_and_kl_on_a_chat_dataset(chat_run, tmp_path):
    """The eval annotator defaults to the training annotator; the reference model gives eval/kl (0 at step 0)."""
    folder, flags, env = chat_run
    args = [*flags, "--online", "--annotator", "python:eval_rewards:words", "--output_dir", str(tmp_path)]
    run_script("dpo_pairwise.py", *args, nproc=2, env=env)
    assert_logged_held_out_eval(tmp_path)
    metrics = [m for m in read_metrics(tmp_path) if "eval/kl" in m]
    assert metrics[0]["eval/kl"] == pytest.approx(0, abs=1e-4) and metrics[-1]["eval/kl"] != metrics[0]["eval/kl"]
