"""The online setups: common/online.py's steps and dpo_pairwise.py --online, with the toy annotator and a flaky HTTP
judge."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from common import online, toy
from common.annotators import Annotator, make_annotator
from common.batch import GENERATIONS, collate, micro_batches
from common.generation import GenerationArgs
from common.model import load_causal_lm, load_tokenizer
from common.online import OnlineSampler, example
from common.reweight import make_reweighter
from conftest import REPO, read_metrics, run_script
from dpo_pairwise import label_pairs

ONLINE = [
    "--online",
    "--max_steps",
    "3",
    "--per_device_batch_size",
    "8",
    "--log_every",
    "1",
    "--eval_every",
    "1000",
    "--eval.num_prompts",
    "16",
]  # a few quick online steps


@pytest.fixture(scope="module")
def policy_and_tokenizer(sft_model, world_of_one):
    tokenizer = load_tokenizer(str(sft_model))
    return load_causal_lm(str(sft_model), tokenizer, torch.device("cpu")), tokenizer


def online_step(policy, tokenizer, annotator, pairwise: bool, size: int = 8, reweighter=None):
    """One online step as dpo_pairwise.py (pairs: ties and failures dropped) and kto_pointwise.py (one sample: every
    score kept) take it: the sampler's rounds, the annotator, the script's labels; the step's rows, the sampler."""
    sampler = OnlineSampler(
        toy.records("train", "prompt"),
        tokenizer,
        GenerationArgs(max_new_tokens=16),
        annotator,
        size=size,
        max_prompt_length=32,
        seed=0,
        group_by_length=True,
        device=torch.device("cpu"),
        sample_reward=toy.true_reward,
    )
    for prompts in sampler.rounds():
        samples = sampler.sample(policy, prompts, num_samples=2 if pairwise else 1)
        raw = [p["raw_prompt"] for p in prompts]
        if pairwise:
            preferences = annotator.prefer(raw, *([pair[i]["response"] for pair in samples] for i in (0, 1)))
            sampler.add(label_pairs(prompts, samples, preferences), failed=preferences.count(None))
        else:
            scores = annotator.score(raw, [s[0]["response"] for s in samples])
            sampler.add([[example(p, s, [c], c is not None)] for p, s, c in zip(prompts, samples, scores)], 0)
    rows = sampler.step_rows()
    return (reweighter(rows) if reweighter is not None else rows), sampler


@pytest.mark.parametrize("pairwise", [True, False])
def test_online_step_labels_samples(policy_and_tokenizer, pairwise):
    policy, tokenizer = policy_and_tokenizer
    rows, sampler = online_step(policy, tokenizer, make_annotator("toy", torch.device("cpu")), pairwise, size=16)
    batches = micro_batches(rows, 8, tokenizer.pad_token_id)
    assert len(batches) == 2 and all(len(b["prompt"]) == 8 for b in batches)  # exactly the step's examples
    assert sorted(r["position"] for r in rows) == list(range(16))
    for batch in batches:
        for i, prompt in enumerate(batch["prompt"]):
            for g in ("generation1", "generation2") if pairwise else ("generation1",):
                ids = batch[f"{g}_token_ids"][i][batch[f"{g}_response_mask"][i]]
                # the sampled ids are trained on as sampled: they decode to the annotated text (+ EOS if it stopped)
                assert tokenizer.decode(ids, skip_special_tokens=True) == batch[f"{g}_response_only"][i]
            if pairwise and batch["trainable"][i]:  # a kept pair: generation1_reward says which one is preferred
                r1, r2 = (toy.true_reward(prompt, batch[f"{g}_response_only"][i]) for g in GENERATIONS)
                assert r1 != r2 and batch["generation1_reward"][i].item() == float(r1 > r2)
                assert batch["generation2_reward"][i].item() == float(r2 > r1)
                assert batch["preference"][i].item() == float(r1 > r2)  # the annotator's verdict reaches the batch
            if pairwise and not batch["trainable"][i]:  # a tie padding the step: weight 0
                assert batch["generation1_weight"][i] == batch["generation2_weight"][i] == 0
            if not pairwise:
                assert batch["generation1_reward"][i].item() == pytest.approx(
                    toy.true_reward(prompt, batch["generation1_response_only"][i])
                )
    metrics = online.metrics(sampler.stats)
    assert online.metrics(sampler.stats) == metrics  # reading the stats does not clear them
    assert metrics["annotator/requests"] == sampler.stats["examples"] > 0  # one request per pair or per response
    assert 0 < metrics["online/kept_fraction"] <= 1 and metrics["online/eos_rate"] > 0.9
    assert metrics["online/sample_reward"] > 0.5
    assert (not pairwise) == (metrics["online/kept_fraction"] == 1)  # pairs that tie are dropped


class UnsureToyJudge(Annotator):
    """Right about the toy task but never sure: 0.9 when response 1 is better, 0.2 when response 2 is, 0.5 a tie."""

    def _prefer(self, prompts, responses1, responses2):
        rewards = [(toy.true_reward(p, a), toy.true_reward(p, b)) for p, a, b in zip(prompts, responses1, responses2)]
        return [0.9 if a > b else 0.2 if b > a else 0.5 for a, b in rewards]


def test_online_step_reweights_by_confidence(policy_and_tokenizer):
    """--reweighter confidence: a kept pair's weight is |2p - 1|: 0.8 where generation1 won (p = 0.9), 0.6 where
    generation2 did (p = 0.2); a step padded with dropped pairs has them at weight 0, not counted."""
    policy, tokenizer = policy_and_tokenizer
    reweighter = make_reweighter("confidence")
    rows, _ = online_step(policy, tokenizer, UnsureToyJudge(), True, reweighter=reweighter)
    batch = collate(rows, tokenizer.pad_token_id)
    kept = batch["trainable"]
    expected = torch.where(batch["generation1_reward"] == 1.0, 0.8, 0.6)
    assert kept.any() and torch.allclose(batch["generation1_weight"][kept], expected[kept])
    assert torch.equal(batch["generation1_weight"], batch["generation2_weight"])
    assert (batch["generation1_weight"][~kept] == 0).all()
    assert reweighter.stats["rows"] == int(kept.sum()) and reweighter.stats["factor_sum"] == pytest.approx(
        expected[kept].sum().item()
    )


class FlakyJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge of the toy task that is right when it answers, but of every 10 requests
    answers 500 to one, stalls past the client's timeout on one and answers garbage to one."""

    count, lock, stall = 0, threading.Lock(), 2.5

    def do_POST(self):
        question = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
        with FlakyJudge.lock:
            FlakyJudge.count += 1
            n = FlakyJudge.count
        if n % 10 == 3:
            return self.send_error(500)
        if n % 10 == 6:
            time.sleep(self.stall)
        found = re.search(
            r"\[Conversation\]\n(.*)\n\n\[Response 1\]\n(.*)\n\n\[Response 2\]\n(.*)\n\nAnswer", question, re.S
        )
        prompt, a, b = found.groups()
        reward_a, reward_b = toy.true_reward(prompt, a), toy.true_reward(prompt, b)
        verdict = "maybe" if n % 10 == 8 else "1" if reward_a > reward_b else "2" if reward_b > reward_a else "1"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_online_dpo_survives_a_flaky_http_judge(sft_model, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        run_script(
            "dpo_pairwise.py",
            *ONLINE,
            "--max_steps",
            "4",
            "--model_name_or_path",
            str(sft_model),
            "--annotator",
            url,
            "--judge.model",
            "toy-judge",
            "--judge.timeout",
            "1",
            "--output_dir",
            str(tmp_path),
            env={"OPENAI_API_KEY": "sk-test-do-not-log"},
        )
    finally:
        server.shutdown()
    metrics = read_metrics(tmp_path)
    annotator = {
        key: sum(m.get(key, 0) for m in metrics) for key in set().union(*metrics) if key.startswith("annotator/")
    }
    assert annotator["annotator/http_500"] > 0 and annotator["annotator/timeout"] > 0
    assert annotator["annotator/unparsable"] > 0  # each step logs its own counts; these are the run's totals
    # failures are dropped (not guessed): a pair fails when either of its two orders fails even after the retries
    assert annotator["annotator/failed"] > 0 and sum(m.get("online/failed", 0) for m in metrics) > 0
    assert len([m for m in metrics if "train/loss" in m]) == 4  # and training went on
    assert "sk-test-do-not-log" not in (tmp_path / "metrics.jsonl").read_text() + (tmp_path / "args.json").read_text()


def test_online_dpo_under_torchrun(sft_model, tmp_path):
    run_script(
        "dpo_pairwise.py", *ONLINE, "--model_name_or_path", str(sft_model), "--output_dir", str(tmp_path), nproc=2
    )
    metrics = read_metrics(tmp_path)
    assert len([m for m in metrics if "train/loss" in m]) == 3 and any("online/kept_fraction" in m for m in metrics)


def test_online_dpo_learns_past_rho(sft_model, tmp_path):
    """From the SFT model (~0.76), online DPO with the toy annotator reaches a true reward >= 0.95, and its held-out
    responses beat the SFT model's far more often than not (0.72 measured; both are often perfect: ties count 1/2)."""
    start = time.time()
    args = ["--online", "--model_name_or_path", str(sft_model), "--eval_every", "1000"]  # evaluated first and last
    run_script("dpo_pairwise.py", *args, "--output_dir", str(tmp_path))
    evals = [m for m in read_metrics(tmp_path) if "eval/reward" in m]
    rewards = [(m["step"], round(m["eval/reward"], 3), round(m["eval/win_rate"], 3)) for m in evals]
    print(f"(step, eval/reward, eval/win_rate) {rewards} in {time.time() - start:.0f} s")
    assert rewards[0][1] < 0.8 and rewards[-1][1] >= 0.95
    assert rewards[0][2] == 0.5 and rewards[-1][2] > 0.65


def test_generate_runs_each_prompt_once_for_its_samples(world_of_one):
    """Greedy (temperature 0) from a sharded policy: prompts of 2 to 6 tokens, 2 samples each (the prompt's KV
    cache copied per sample) give the same tokens as the prompts repeated and sampled once each, and the
    parameters are sharded again afterwards."""
    from torch.distributed.tensor import DTensor

    from common.batch import pad
    from common.distributed import prepare_model
    from common.generation import generate

    tokenizer = load_tokenizer("toy")
    cpu = torch.device("cpu")
    policy = prepare_model(load_causal_lm("toy", tokenizer, cpu), cpu, torch.float32, shard=True)
    prompts = [tokenizer(p)["input_ids"] for p in ("a", "dbca=", "fedcba=")]
    options = dict(
        max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, temperature=0.0
    )
    shared = generate(policy, *pad(prompts, tokenizer.pad_token_id, left=True), **options, num_samples=2)[0]
    repeated = generate(
        policy, *pad([p for p in prompts for _ in range(2)], tokenizer.pad_token_id, left=True), **options
    )[0]
    assert shared.shape[0] == 6 and torch.equal(shared, repeated) and torch.equal(shared[0::2], shared[1::2])
    assert all(isinstance(p, DTensor) for p in policy.parameters())


def test_sampling_follows_the_distribution():
    """p = [0.5, 0.3, 0.2, 0]: 20k samples match within 1.5%; top_p 0.6 keeps the two likeliest tokens
    (renormalised to 0.625 / 0.375); temperature 0 is the argmax."""
    from common.generation import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, 1.0, 1.0, generator), minlength=4) / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015)
    freq = torch.bincount(sample(logits, 1.0, 0.6, generator), minlength=4) / 20000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    assert sample(logits[:2], 0.0, 1.0, generator).tolist() == [0, 0]


def test_soft_label_fork_is_a_few_lines(sft_model, tmp_path):
    """cDPO with the annotator's probability as the label: two lines changed in dpo_pairwise.py's dpo_loss, nothing in
    common/. With the toy annotator's sure verdicts (p = 1 or 0) the soft label is the hard one, so the fork trains
    exactly as DPO does."""
    source = (REPO / "dpo_pairwise.py").read_text()
    line = "        eps = args.label_smoothing\n"
    soft = (
        '        preference = batch["preference"]  # the annotator\'s probability that generation1 is better\n'
        "        eps = 1 - torch.maximum(preference, 1 - preference)  # doubt in the chosen\n"
    )
    at = source.index(line)  # the one place the loss is written
    (tmp_path / "dpo_soft.py").write_text(source[:at] + soft + source[at + len(line) :])
    args = [*ONLINE, "--model_name_or_path", str(sft_model)]
    run_script("dpo_pairwise.py", *args, "--output_dir", str(tmp_path / "dpo"))
    run_script(
        str(tmp_path / "dpo_soft.py"), *args, "--output_dir", str(tmp_path / "soft"), env={"PYTHONPATH": str(REPO)}
    )
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m] for d in ("dpo", "soft")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
