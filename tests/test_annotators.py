"""Annotators: known values for toy and python functions, reward model == a direct forward, the local judge's
antisymmetry, and the HTTP judge against OpenAI-compatible servers started here on 127.0.0.1 (a correct one,
a position-biased one and a flaky one), including where the API key may and may not appear."""

import json
import math
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from common.annotators import JudgeArgs, make_annotator
from common.model import load_causal_lm, load_reward_model, load_tokenizer

CPU = torch.device("cpu")
KEY = "sk-test-Zq8vKEY-must-never-leak-41"
PAIR_TEMPLATE = "Q:{prompt}\n1:{response1}\n2:{response2}"  # easy for the test servers to parse
SCORE_TEMPLATE = "Q:{prompt}\nR:{response}"


def test_toy_known_values():
    annotator = make_annotator("toy", CPU)
    assert annotator.score(["dbca=", "dbca=", "cab="], ["abcd", "bacd", "xyz"]) == [1.0, 0.5, 0.0]
    assert annotator.prefer(["dbca="] * 3, ["abcd", "bacd", "abcd"], ["bacd", "abcd", "abcd"]) == [1.0, 0.0, 0.5]
    assert annotator.stats == Counter(requests=6, failed=0)
    assert annotator.score([], []) == []


def test_unknown_spec_and_option_fail_in_one_line():
    for spec in ("gpt4", "reward_model:", "python:only_module", "http:localhost:8000/v1"):
        with pytest.raises(SystemExit) as e:
            make_annotator(spec, CPU, JudgeArgs(model="m"))
        assert "\n" not in str(e.value) and "annotator" in str(e.value)
    with pytest.raises(SystemExit, match="python:MODULE:FUNCTION"):
        make_annotator("gpt4", CPU)


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "annotator_test_rewards.py").write_text(
        "def exact_match(prompts, responses):\n"
        "    return [float(r == p.upper()) for p, r in zip(prompts, responses)]\n"
        "def too_short(prompts, responses):\n"
        "    return [1.0]\n"
        "def words(prompts, responses):\n"
        "    return ['good' for r in responses]\n"
        "def some_none(prompts, responses):\n"
        "    return [None if r == '?' else 1 for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "annotator_test_rewards"


def test_python_function(rewards_module):
    annotator = make_annotator(f"python:{rewards_module}:exact_match", CPU)
    assert annotator.score(["ab", "cd"], ["AB", "cd"]) == [1.0, 0.0]
    assert annotator.prefer(["ab", "ab", "ab"], ["AB", "x", "x"], ["x", "AB", "y"]) == [1.0, 0.0, 0.5]
    annotator = make_annotator(f"python:{rewards_module}:some_none", CPU)
    assert annotator.score(["a", "b"], ["?", "ok"]) == [None, 1.0]  # the function's own failures pass through
    assert annotator.prefer(["a", "b"], ["?", "ok"], ["ok", "ok"]) == [None, 0.5]
    assert annotator.stats["failed"] == 2
    for function, message in (("too_short", "list of 2 floats"), ("words", "finite numbers")):
        with pytest.raises(SystemExit, match=message) as e:
            make_annotator(f"python:{rewards_module}:{function}", CPU).score(["a", "b"], ["x", "y"])
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no function 'nope'"):
        make_annotator(f"python:{rewards_module}:nope", CPU)
    with pytest.raises(SystemExit, match="module 'no_such_rewards_module'"):
        make_annotator("python:no_such_rewards_module:f", CPU)


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory):
    """A tiny random reward model and a tiny random causal LM, each saved with the toy tokenizer."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("toy")
    reward_model = load_reward_model("toy", tokenizer, CPU).eval()
    rm_path, lm_path = tmp_path_factory.mktemp("rm"), tmp_path_factory.mktemp("lm")
    reward_model.save_pretrained(rm_path)
    load_causal_lm("toy", tokenizer, CPU).save_pretrained(lm_path)
    for path in (rm_path, lm_path):
        tokenizer.save_pretrained(path)
    return reward_model, tokenizer, rm_path, lm_path


def test_reward_model_matches_a_direct_forward(toy_folders):
    reward_model, tokenizer, rm_path, lm_path = toy_folders
    annotator = make_annotator(f"reward_model:{rm_path}", CPU)
    prompts, responses = ["dbca=", "zyx=", "dbca="], ["abcd", "xy", "abdc"]
    scores = annotator.score(prompts, responses)
    with torch.no_grad():  # one unpadded sequence at a time: prompt tokens (with BOS), response tokens, EOS
        expected = [
            reward_model(
                input_ids=torch.tensor(
                    [
                        tokenizer(p)["input_ids"]
                        + tokenizer.encode(r, add_special_tokens=False)
                        + [tokenizer.eos_token_id]
                    ]
                )
            )
            .logits[0, 0]
            .item()
            for p, r in zip(prompts, responses)
        ]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3  # a random head still tells the responses apart
    # Bradley-Terry: P(response1 is better) = sigmoid(r1 - r2); exactly 0.5 for the same response twice
    preferences = annotator.prefer(prompts, responses, responses[::-1])
    difference = scores[0] - scores[2]
    assert preferences == pytest.approx(
        [1 / (1 + math.exp(-difference)), 0.5, 1 / (1 + math.exp(difference))], abs=1e-6
    )
    assert (
        preferences[1] == 0.5 and 0 < preferences[0] < 1 and preferences[0] != 0.5
    )  # a probability, not a hard verdict
    with pytest.raises(SystemExit, match="not a sequence-classification model") as e:
        make_annotator(f"reward_model:{lm_path}", CPU)
    assert "\n" not in str(e.value)


def test_local_judge_is_antisymmetric(toy_folders, monkeypatch):
    *_, lm_path = toy_folders
    annotator = make_annotator(f"judge:{lm_path}", CPU, JudgeArgs(batch_size=3))  # batches of 3: padding in play
    prompts = ["dbca=", [{"role": "user", "content": "sort zyx"}], "qwer="]
    a, b = ["abcd", "xyz", "eqrw"], ["bacd", "zyx", "eqr"]
    ab, ba = annotator.prefer(prompts, a, b), annotator.prefer(prompts, b, a)
    assert all(0 <= p <= 1 for p in ab)
    assert ab == pytest.approx([1 - p for p in ba], abs=1e-6)
    assert len(set(ab)) == 3  # the verdict depends on the pair (a constant would also be antisymmetric at 0.5)
    assert annotator.stats["judge_order_agreement"] + annotator.stats["judge_order_disagreement"] == 6
    scores = annotator.score(prompts, a)
    assert all(0 <= s <= 9 for s in scores) and len(set(scores)) == 3
    assert annotator.prefer(prompts[:1], a[:1], a[:1]) == pytest.approx([0.5])  # same response twice: a tie
    short = {"score_template": "{prompt} -> {response}\n"}  # padding must not change a question's answer
    one_by_one = make_annotator(f"judge:{lm_path}", CPU, JudgeArgs(batch_size=1, **short)).score(prompts, b)
    assert make_annotator(f"judge:{lm_path}", CPU, JudgeArgs(batch_size=3, **short)).score(prompts, b) == pytest.approx(
        one_by_one, abs=1e-5
    )

    chat = make_annotator(f"judge:{lm_path}", CPU, JudgeArgs(template=PAIR_TEMPLATE))
    monkeypatch.setattr(
        chat.tokenizer,
        "chat_template",
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>",
        raising=False,
    )
    assert chat.encode("hi") == chat.tokenizer.encode("<user>hi<assistant>", add_special_tokens=False)
    assert chat.prefer(prompts, a, b) == pytest.approx([1 - p for p in chat.prefer(prompts, b, a)], abs=1e-6)
    with pytest.raises(SystemExit, match="--judge.template"):
        make_annotator(f"judge:{lm_path}", CPU, JudgeArgs(template="{prompt} {answer}"))


@pytest.fixture
def judge_server():
    """Starts OpenAI-compatible /v1/chat/completions servers on 127.0.0.1 in daemon threads, stopped after the test.
    `answer(question, n)`, where n counts earlier requests with the same question, returns an HTTP status, a reply
    text and a delay. Each server records (Authorization header, path, model, question) for every request."""
    servers = []

    def start(answer):
        received, seen, lock = [], Counter(), threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = request["messages"][0]["content"]
                with lock:
                    received.append((self.headers.get("Authorization"), self.path, request["model"], question))
                    n, seen[question] = seen[question], seen[question] + 1
                status, text, delay = answer(question, n)
                time.sleep(delay)
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): expected
                    pass

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", received

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def longer_is_better(question, n):
    """A correct judge: prefers the longer response; scores a response by its length."""
    if question.startswith("Q:") and "\nR:" in question:
        return 200, f" {min(len(question.split(chr(10) + 'R:')[1]), 10)}\n", 0
    first, second = re.fullmatch(r"Q:.*\n1:(.*)\n2:(.*)", question, re.DOTALL).groups()
    return 200, "1" if len(first) > len(second) else "2", 0


@pytest.fixture
def judge_env(monkeypatch):
    """Traffic straight to 127.0.0.1 (no proxy), the test key in JUDGE_TEST_KEY and no real key anywhere."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)


def test_http_judge_verdicts_and_api_key(judge_server, judge_env, capsys):
    url, received = judge_server(longer_is_better)
    options = {
        "model": "judge-7b",
        "api_key_env": "JUDGE_TEST_KEY",
        "template": PAIR_TEMPLATE,
        "score_template": SCORE_TEMPLATE,
    }
    for spec in (f"http:{url}", url):
        annotator = make_annotator(spec, CPU, JudgeArgs(**options))
        prompts = ["p", [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}], "p"]
        # equal lengths: both orders answer "2", so the orders disagree and the pair is a tie
        assert annotator.prefer(prompts, ["long one", "a", "same"], ["short", "longer", "same"]) == [1.0, 0.0, 0.5]
        assert annotator.stats["judge_order_agreement"] == 2 and annotator.stats["judge_order_disagreement"] == 1
        assert annotator.score(["p", "p", "p"], ["abc", "", "abcdefghijklmnop"]) == [3.0, 0.0, 10.0]
        assert annotator.stats == Counter(
            requests=6, failed=0, unparsable=0, judge_order_agreement=2, judge_order_disagreement=1
        )
    assert {(auth, path, model) for auth, path, model, _ in received} == {
        (f"Bearer {KEY}", "/v1/chat/completions", "judge-7b")
    }
    assert any("Q:User: hello\nAssistant: hi\n1:" in question for *_, question in received)
    assert KEY not in str(annotator.stats) and KEY not in repr(vars(annotator))
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def flaky(question, n):
    """Deterministic trouble, chosen by a word in the question (in either position of a pair)."""
    if "err500" in question:
        return 500, "", 0
    if "once500" in question and n == 0:
        return 503, "", 0
    if "stall" in question:
        return 200, "1", 3.0  # past judge_timeout (1.5 s: generous, so that only stalls time out on a loaded machine)
    for word, garbage in (("maybe", "maybe"), ("empty", ""), ("three", "3"), ("eleven", "11")):
        if word in question:
            return 200, garbage, 0
    return longer_is_better(question, n)


def test_http_judge_counts_failures_and_never_guesses(judge_server, judge_env, capsys):
    url, received = judge_server(flaky)
    annotator = make_annotator(
        f"http:{url}",
        CPU,
        JudgeArgs(
            model="m",
            api_key_env="JUDGE_TEST_KEY",
            retries=1,
            backoff=0.01,
            timeout=1.5,
            template=PAIR_TEMPLATE,
            score_template=SCORE_TEMPLATE,
        ),
    )
    start = time.perf_counter()
    responses1 = ["long one", "a", "err500", "stall", "maybe", "empty", "three", "once500 long"]
    responses2 = ["short", "longer", "b", "b", "b", "b", "b", "b"]
    assert annotator.prefer(["p"] * 8, responses1, responses2) == [1.0, 0.0, None, None, None, None, None, 1.0]
    assert annotator.score(["p"] * 5, ["abc", "eleven", "maybe", "err500", "7 chars"]) == [3.0, None, None, None, 7.0]
    assert time.perf_counter() - start < 10
    # pairs: err500 2 questions x 2 attempts, once500 2 x 1; stall 2 x 2 timeouts; maybe/empty/three 2 each.
    # scores: eleven and maybe unparsable, err500 1 x 2 attempts. Retries: one per failed first attempt (7).
    expected = {
        "requests": 13,
        "failed": 8,
        "http_error": 8,
        "http_500": 6,
        "http_503": 2,
        "retries": 7,
        "timeout": 4,
        "unparsable": 8,
        "judge_order_agreement": 3,
    }
    assert {k: annotator.stats[k] for k in expected} == expected
    assert annotator.stats["connection_error"] == 0 and annotator.stats["judge_order_disagreement"] == 0
    assert all(auth == f"Bearer {KEY}" for auth, *_ in received)
    captured = capsys.readouterr()
    assert KEY not in str(annotator.stats) + captured.out + captured.err


def test_http_judge_position_bias_and_unreachable(judge_server, judge_env, capsys):
    url, received = judge_server(lambda question, n: (200, "1", 0))  # always picks the first shown
    annotator = make_annotator(url, CPU, JudgeArgs(model="m", template=PAIR_TEMPLATE))  # $OPENAI_API_KEY is unset
    assert annotator.prefer(["p", "p"], ["a", "bb"], ["bb", "a"]) == [0.5, 0.5]
    assert annotator.stats["judge_order_disagreement"] == 2
    assert [auth for auth, *_ in received] == [None] * 4 and "$OPENAI_API_KEY is not set" in capsys.readouterr().out
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    annotator = make_annotator(f"http://127.0.0.1:{port}/v1", CPU, JudgeArgs(model="m", retries=2, backoff=0.01))
    assert annotator.score(["p", "p"], ["a", "b"]) == [None, None]
    assert (
        annotator.stats["connection_error"] == 6 and annotator.stats["retries"] == 4 and annotator.stats["failed"] == 2
    )
    with pytest.raises(SystemExit, match="--judge.model"):
        make_annotator(url, CPU)


def test_http_judge_deadline_bounds_a_judge_that_never_answers(judge_server, judge_env, capsys):
    """A server that accepts the connection and answers after 5 s, with --judge.timeout 30: without a deadline one
    call would wait 5 s per question; with --judge.deadline 1 it returns after about 1 s, every question failed and
    counted under `deadline`, while an answering server's questions are unaffected."""
    slow, _ = judge_server(lambda question, n: (200, "1", 5.0))
    annotator = make_annotator(slow, CPU, JudgeArgs(model="m", timeout=30.0, deadline=1.0, template=PAIR_TEMPLATE))
    start = time.perf_counter()
    assert annotator.prefer(["p"] * 3, ["a", "b", "c"], ["x", "y", "z"]) == [None, None, None]
    assert time.perf_counter() - start < 3
    assert annotator.stats["deadline"] == 6 and annotator.stats["failed"] == 3  # 3 pairs, both orders
    assert "6 of 6 questions unanswered within --judge.deadline 1.0 s" in capsys.readouterr().out
    fast, _ = judge_server(longer_is_better)
    annotator = make_annotator(fast, CPU, JudgeArgs(model="m", deadline=5.0, template=PAIR_TEMPLATE))
    assert annotator.prefer(["p"], ["long one"], ["short"]) == [1.0] and annotator.stats["deadline"] == 0
