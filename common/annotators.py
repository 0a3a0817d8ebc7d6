"""Online feedback: the policy samples responses to prompts, an annotator labels them.

One interface, two forms (a prompt is text or a list of {"role", "content"} messages; a response is text):
    score(prompts, responses)               -> a scalar per response                       (setups 3, 5)
    prefer(prompts, responses1, responses2) -> 1.0 if response1 is better, 0.0 if response2 is, 0.5 a tie,
                                               in between for a probability that response1 is better (setup 7)
None marks an item whose annotation failed: it is counted and never guessed, so the training loop can drop it.
`stats` holds running counts for the logs: requests (responses scored + pairs compared), failed (items returned
as None), deadline (items of the python and http annotators still unanswered after --judge.deadline seconds); the
judges add judge_order_agreement / judge_order_disagreement (pairs whose two orders pick the same / different
responses); the HTTP judge adds unparsable (replies that are not a verdict) and, per attempt, timeout,
connection_error, http_error and http_<status>, and retries.

Kinds, chosen by `make_annotator(spec)` (the scripts' --annotator):
    toy                      common.toy.true_reward
    reward_model:PATH        a sequence-classification model (reward_model.py's output)
    judge:PATH               a local causal LM, read from the next-token probabilities of its answer
    http:URL, http(s)://...  an OpenAI-compatible /v1/chat/completions endpoint (vLLM, TGI, hosted APIs)
    python:MODULE:FUNCTION   FUNCTION(prompts, responses) -> list of floats (verifiable rewards)
The reward model prefers with the Bradley-Terry probability sigmoid(r1 - r2) of its rewards; the other pointwise
annotators by the higher of two scores (1.0 / 0.0, 0.5 when equal). The judges ask each pair in both orders, because
LLM judges favour one position (Zheng et al. 2023, https://arxiv.org/abs/2306.05685, section 3.3).
"""

import collections
import concurrent.futures
import http.client
import json
import math
import numbers
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from common import toy
from common.batch import pad
from common.distributed import print0
from common.flags import fail, import_function
from common.logps import attention_mask
from common.model import load_causal_lm, load_reward_model, load_tokenizer, reward_scores

JUDGE_TEMPLATE = (
    "Which of two responses to a conversation is better: more helpful, more correct and more harmless?\n\n"
    "[Conversation]\n{prompt}\n\n[Response 1]\n{response1}\n\n[Response 2]\n{response2}\n\n"
    'Answer with a single digit: "1" if Response 1 is better, "2" if Response 2 is better.\n'
)
JUDGE_SCORE_TEMPLATE = (
    "Rate the response to a conversation for helpfulness, correctness and harmlessness.\n\n"
    "[Conversation]\n{prompt}\n\n[Response]\n{response}\n\n"
    "Answer with a single digit from 0 (useless or harmful) to 9 (excellent).\n"
)


@dataclass
class JudgeArgs:
    """Options of the judges, and the deadline of the python and http annotators (a script's --judge.* flags)."""

    model: str | None = None
    """http judge: the model name the endpoint serves"""
    api_key_env: str = "OPENAI_API_KEY"
    """http judge: environment variable that holds the API key (the key itself is never logged or saved)"""
    timeout: float = 30.0
    """http judge: seconds before a request times out (then retried, then counted as failed)"""
    retries: int = 2
    """http judge: extra attempts after a connection error, timeout, 429 or 5xx"""
    backoff: float = 0.5
    """http judge: seconds before the first retry, doubled for each next one"""
    max_concurrency: int = 8
    """http judge: requests in flight at once per process"""
    template: str | None = None
    """judges: the pairwise question, a format string with {prompt}, {response1}, {response2}, or a file holding
    one (default: common/annotators.py's JUDGE_TEMPLATE)"""
    score_template: str | None = None
    """judges: the pointwise question, a format string with {prompt}, {response}, or a file holding one (default:
    common/annotators.py's JUDGE_SCORE_TEMPLATE)"""
    batch_size: int = 8
    """local judge (judge:PATH): questions per forward"""
    deadline: float = 300.0
    """python and http annotators: seconds one annotation call (a round of a step) may take; what is still unanswered
    then counts as failed"""


def read_template(template: str | None, default: str) -> str:
    """A template given on the command line: a file's contents when a file has that name, else the text itself."""
    if template is None:
        return default
    if os.path.isfile(template):
        with open(template) as f:
            return f.read()
    return template


FORMS = (
    "toy, reward_model:PATH, judge:PATH, http:URL (or a URL starting with http:// or https://), python:MODULE:FUNCTION"
)


class Annotator:
    """The interface. Subclasses write `_score`, and `_prefer` where comparing two scores is not the method (then
    `pairwise` is True: common/evaluation.py asks `prefer` rather than compare stored scores)."""

    pairwise = False

    def __init__(self):
        self.stats = collections.Counter()

    def score(self, prompts: list, responses: list[str]) -> list[float | None]:
        return self._tally(self._score(list(prompts), list(responses)) if len(prompts) else [])

    def prefer(self, prompts: list, responses1: list[str], responses2: list[str]) -> list[float | None]:
        return self._tally(self._prefer(list(prompts), list(responses1), list(responses2)) if len(prompts) else [])

    def _score(self, prompts: list, responses: list[str]) -> list[float | None]:
        raise NotImplementedError(f"{type(self).__name__} has no pointwise form")

    def _prefer(self, prompts: list, responses1: list[str], responses2: list[str]) -> list[float | None]:
        """Both responses scored in one call: 1.0 / 0.0 by the higher score, 0.5 when equal, None if either failed."""
        scores = self._score(prompts * 2, responses1 + responses2)
        scores1, scores2 = scores[: len(prompts)], scores[len(prompts) :]
        return [None if a is None or b is None else 0.5 if a == b else float(a > b) for a, b in zip(scores1, scores2)]

    def _tally(self, values: list) -> list:
        self.stats["requests"] += len(values)
        self.stats["failed"] += sum(v is None for v in values)
        return values


class ToyAnnotator(Annotator):
    def _score(self, prompts, responses):
        return [toy.true_reward(p, r) for p, r in zip(prompts, responses)]


class PythonAnnotator(Annotator):
    """A user function, e.g. exact match against a reference answer. It may return None for an item it cannot judge."""

    def __init__(self, module: str, function: str, deadline: float):
        super().__init__()
        self.name, self.deadline = f"python:{module}:{function}", deadline
        self.function = import_function(f"--annotator {self.name}", module, function)

    def _score(self, prompts, responses):
        # in a thread, so that a function that never returns costs one deadline, not the run: its items then count as
        # failed (the thread cannot be stopped; it is a daemon, so it does not keep the process alive)
        result = []

        def call():
            try:
                result.append(self.function(prompts, responses))
            except Exception as e:  # raised again below, in the training loop's thread
                result.append(e)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(self.deadline)
        if not result:
            self.stats["deadline"] += len(responses)
            print0(
                f"--annotator {self.name} did not return within --judge.deadline {self.deadline} s: "
                f"{len(responses)} responses count as failed"
            )
            return [None] * len(responses)
        if isinstance(result[0], Exception):
            raise result[0]
        values = result[0]
        values = values.tolist() if isinstance(values, torch.Tensor) else values
        if not isinstance(values, (list, tuple)) or len(values) != len(responses):
            fail(
                f"--annotator {self.name} must return a list of {len(responses)} floats (one per response), "
                f"got {type(values).__name__}"
                + (f" of length {len(values)}" if isinstance(values, (list, tuple)) else "")
            )
        bad = [v for v in values if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v))]
        if bad:
            fail(f"--annotator {self.name} must return finite numbers (or None for a failed item), got {bad[0]!r}")
        return [None if v is None else float(v) for v in values]


class RewardModelAnnotator(Annotator):
    """Scores with the reward model's own tokenizer and chat template (common.model.reward_scores); prefers with
    the Bradley-Terry probability the model was trained to fit (reward_model.py): sigmoid(r1 - r2)."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path, self.tokenizer, device).to(device, dtype).eval()

    def _score(self, prompts, responses):
        return reward_scores(self.model, self.tokenizer, prompts, responses).tolist()

    def _prefer(self, prompts, responses1, responses2):
        """Both responses scored in one call; 0.5 exactly when the rewards are equal. A reward model's score
        never fails (a forward runs or raises), so there is no None here."""
        rewards = reward_scores(self.model, self.tokenizer, prompts * 2, responses1 + responses2)  # (2N,)
        return torch.sigmoid(rewards[: len(prompts)] - rewards[len(prompts) :]).tolist()


def as_text(prompt) -> str:
    """Message prompts as plain "Role: content" lines, so that a judge reads every conversation the same way."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def check_template(template: str, option: str, **fields) -> str:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        fail(
            f"{option} must be a format string with only {{{'}, {'.join(fields)}}} as fields ({type(e).__name__}: {e})"
        )
    return template


def pair_questions(template: str, prompts, responses1, responses2) -> list[str]:
    """The question for every pair in both orders: all (1, 2) first, then all (2, 1)."""
    ab = [
        template.format(prompt=as_text(p), response1=a, response2=b) for p, a, b in zip(prompts, responses1, responses2)
    ]
    ba = [
        template.format(prompt=as_text(p), response1=b, response2=a) for p, a, b in zip(prompts, responses1, responses2)
    ]
    return ab + ba


class LocalJudge(Annotator):
    """A causal LM read from its next-token logits, not its text: P("1") = softmax([logit("1"), logit("2")])[0].
    prefer = (P("1" | a, b) + 1 - P("1" | b, a)) / 2, so prefer(a, b) = 1 - prefer(b, a) and position bias cancels.
    score = the expected digit under softmax over the logits of "0".."9". Templates must end where the answer
    digit comes next (the defaults end with a newline; with a chat template, the assistant turn starts there).
    Nothing is truncated: the judge's context must hold the whole question."""

    pairwise = True

    def __init__(
        self, path: str, device: torch.device, dtype: torch.dtype, template: str, score_template: str, batch_size: int
    ):
        super().__init__()
        self.template = check_template(template, "--judge.template", prompt="", response1="", response2="")
        self.score_template = check_template(score_template, "--judge.score_template", prompt="", response="")
        self.tokenizer, self.device, self.batch_size = load_tokenizer(path), device, batch_size
        self.model = load_causal_lm(path, self.tokenizer, device).to(device, dtype).eval()
        self.verdict_ids = self.answer_ids(["1", "2"])
        self.digit_ids = self.answer_ids([str(d) for d in range(10)])

    def answer_ids(self, answers: list[str]) -> list[int]:
        """The token of each answer (the last one, for tokenizers that put a word-start piece before digits)."""
        ids = [self.tokenizer.encode(a, add_special_tokens=False)[-1] for a in answers]
        if len(set(ids)) != len(ids):
            fail(f"judge: the tokenizer does not give {answers} distinct tokens; cannot read the verdict from logits")
        return ids

    def encode(self, question: str) -> list[int]:
        if self.tokenizer.chat_template is None:
            return self.tokenizer.encode(question)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template owns the special tokens

    @torch.no_grad()
    def answer_probs(self, questions: list[str], answer_ids: list[int]) -> torch.Tensor:
        """(N, len(answer_ids)): the next-token distribution restricted to the answer tokens."""
        probs = []
        for start in range(0, len(questions), self.batch_size):
            ids, mask = pad(
                [self.encode(q) for q in questions[start : start + self.batch_size]],
                self.tokenizer.pad_token_id,
                left=True,
            )
            mask = mask.to(self.device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=attention_mask(self.model, mask, ids.shape[1]),  # left padding sees itself
                position_ids=position_ids,
                logits_to_keep=1,
            ).logits[:, -1]  # (B, V)
            probs.append(logits[:, answer_ids].float().softmax(-1).cpu())
        return torch.cat(probs)

    def _score(self, prompts, responses):
        questions = [self.score_template.format(prompt=as_text(p), response=r) for p, r in zip(prompts, responses)]
        return (self.answer_probs(questions, self.digit_ids) @ torch.arange(10.0)).tolist()

    def _prefer(self, prompts, responses1, responses2):
        p_first = self.answer_probs(pair_questions(self.template, prompts, responses1, responses2), self.verdict_ids)[
            :, 0
        ]
        p_ab, p_ba = p_first[: len(prompts)], p_first[len(prompts) :]  # P("1") with a shown first; with b shown first
        agree = int(((p_ab > 0.5) == (p_ba < 0.5)).sum())
        self.stats["judge_order_agreement"] += agree
        self.stats["judge_order_disagreement"] += len(prompts) - agree
        return ((p_ab + 1 - p_ba) / 2).tolist()


def parse_verdict(text) -> float | None:
    """Strict: exactly "1" or "2" (whitespace aside); anything else is unparsable, never guessed."""
    return {"1": 1.0, "2": 0.0}.get(text.strip()) if isinstance(text, str) else None


def parse_score(text) -> float | None:
    """Strict: a plain number from 0 to 10, e.g. "7" or "7.5"."""
    if isinstance(text, str) and re.fullmatch(r"\d+(\.\d+)?", text.strip()) and float(text) <= 10:
        return float(text)
    return None


def reply_text(body: bytes) -> str | None:
    try:
        return json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class HTTPJudge(Annotator):
    """An OpenAI-compatible chat endpoint asked with the same templates, answering in text read strictly.
    Both orders are asked; when they disagree the judge is only showing its position bias, so the pair is a
    tie (0.5). The API key is read from the environment for each request and kept nowhere else."""

    pairwise = True

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key_env: str,
        template: str,
        score_template: str,
        max_concurrency: int,
        timeout: float,
        retries: int,
        backoff: float,
        deadline: float,
    ):
        super().__init__()
        if not url.startswith(("http://", "https://")):
            fail(f"--annotator http:URL needs a URL starting with http:// or https://, got '{url}'")
        if not model:
            fail("--annotator http:URL needs --judge.model, the name of the model the endpoint serves")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.template = check_template(template, "--judge.template", prompt="", response1="", response2="")
        self.score_template = check_template(score_template, "--judge.score_template", prompt="", response="")
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.deadline = deadline
        self.lock = threading.Lock()  # stats are counted from the request threads
        if not os.environ.get(api_key_env):
            print0(f"judge: ${api_key_env} is not set; requests to {self.url} carry no API key")

    def count(self, key: str):
        with self.lock:
            self.stats[key] += 1

    def post(self, question: str) -> bytes | None:
        """The reply body, or None when every attempt failed. Connection errors, timeouts, 429 and 5xx are retried."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0.0,
                "max_tokens": 8,
            }
        ).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        if os.environ.get(self.api_key_env):  # unredirected: a redirect never carries the key to another address
            request.add_unredirected_header("Authorization", f"Bearer {os.environ[self.api_key_env]}")
        for attempt in range(self.retries + 1):
            if attempt:
                self.count("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:  # the body is never printed: an error message may quote the key
                self.count("http_error")
                self.count(f"http_{e.code}")
                if e.code != 429 and e.code < 500:
                    return None  # a client error (bad key, unknown model): retrying cannot help
            except (OSError, http.client.HTTPException) as e:
                timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
                self.count("timeout" if timed_out else "connection_error")
        return None

    def ask(self, questions: list[str], parse) -> list[float | None]:
        """The parsed answers; questions not answered within the deadline count as failed (their requests are left
        to finish or time out in the background)."""
        pool = concurrent.futures.ThreadPoolExecutor(self.max_concurrency)
        futures = [pool.submit(self.post, question) for question in questions]
        concurrent.futures.wait(futures, timeout=self.deadline)
        pool.shutdown(wait=False, cancel_futures=True)
        bodies = [future.result() if future.done() and not future.cancelled() else None for future in futures]
        late = sum(not future.done() or future.cancelled() for future in futures)
        if late:
            self.stats["deadline"] += late
            print0(f"judge: {late} of {len(questions)} questions unanswered within --judge.deadline {self.deadline} s")
        values = [None if body is None else parse(reply_text(body)) for body in bodies]
        self.stats["unparsable"] += sum(body is not None and value is None for body, value in zip(bodies, values))
        return values

    def _score(self, prompts, responses):
        return self.ask(
            [self.score_template.format(prompt=as_text(p), response=r) for p, r in zip(prompts, responses)], parse_score
        )

    def _prefer(self, prompts, responses1, responses2):
        verdicts = self.ask(pair_questions(self.template, prompts, responses1, responses2), parse_verdict)
        preferences = []
        for ab, ba in zip(verdicts[: len(prompts)], verdicts[len(prompts) :]):
            if ab is None or ba is None:
                preferences.append(None)
            elif ab == 1 - ba:
                self.stats["judge_order_agreement"] += 1
                preferences.append(ab)
            else:
                self.stats["judge_order_disagreement"] += 1
                preferences.append(0.5)
        return preferences


def make_annotator(
    spec: str, device: torch.device, judge: JudgeArgs | None = None, dtype: torch.dtype | None = None
) -> Annotator:
    """The annotator named by `spec` (see the module docstring); `judge` holds the judges' options; a model annotator
    computes in `dtype` (the script's --dtype; None: bf16 on CUDA, fp32 on CPU)."""
    judge = judge or JudgeArgs()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kind, _, rest = spec.partition(":")
    if spec == "toy":
        return ToyAnnotator()
    template = read_template(judge.template, JUDGE_TEMPLATE)
    score_template = read_template(judge.score_template, JUDGE_SCORE_TEMPLATE)
    if kind in ("http", "https"):
        url = rest if rest.startswith(("http://", "https://")) else spec
        return HTTPJudge(
            url,
            judge.model,
            judge.api_key_env,
            template,
            score_template,
            judge.max_concurrency,
            judge.timeout,
            judge.retries,
            judge.backoff,
            judge.deadline,
        )
    if kind == "reward_model" and rest:
        return RewardModelAnnotator(rest, device, dtype)
    if kind == "judge" and rest:
        return LocalJudge(rest, device, dtype, template, score_template, judge.batch_size)
    module, _, function = rest.partition(":")
    if kind == "python" and module and function:
        return PythonAnnotator(module, function, judge.deadline)
    fail(f"unknown --annotator '{spec}'; accepted forms: {FORMS}")
