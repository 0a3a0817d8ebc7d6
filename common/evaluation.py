"""Held-out generation eval: did the policy get better? The number RLHF papers report, on any dataset.

Every --eval_every steps the policy samples one response to each of --eval.num_prompts held-out prompts (batched,
--eval.batch_size prompts at a time on each process, sharded over processes, at --eval.temperature from a generator
seeded afresh each time, so two evaluations of the same weights give the same numbers), and the eval annotator
(--eval.annotator, the forms of --annotator) judges them:

    eval/score            mean score of the policy's responses (the annotator's pointwise form)
    eval/win_rate         how often the annotator prefers the policy's response to the initial policy's response to
                          the same prompt: 1 a win, 0 a loss, 1/2 a tie; an identical response is a tie, not asked
    eval/failed           fraction of the annotator's answers (scores; a judge's verdicts) that failed: dropped from
                          eval/score and eval/win_rate, never guessed
    eval/response_length  response tokens (EOS included)
    eval/eos_rate         fraction of responses that ended with EOS within --generation.max_new_tokens
    eval/kl               mean of log pi(y|x) - log ref(y|x) over the policy's responses (where the script holds the
                          reference model), a sample estimate of KL(pi || ref) at --eval.temperature 1
    eval/reward           the toy task only: the true reward (there the toy annotator's score is this, so no eval/score)

The initial policy's responses are those of the first evaluation, at step 0 before any training; they are kept in
output_dir/eval_initial.jsonl (with their scores), so a resumed run is compared with the same responses. Win rates:
the judges (judge:, http:) are asked the pair in both orders (common/annotators.py); annotators whose preference is
the comparison of two scores (toy, python:, reward_model:) compare the policy's score with the stored initial score.
A few prompts with both responses, the scores and the verdict go to a table: wandb's under --track, else
output_dir/eval_samples.jsonl.
"""

import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import toy
from common.annotators import ToyAnnotator, as_text, make_annotator
from common.batch import collate, tokenize_records
from common.data import load_eval_records
from common.distributed import gather_objects, is_main, print0, sum_over_processes
from common.flags import fail
from common.generation import generate
from common.logps import shared_prompt_logps
from common.model import adapters_off

INITIAL = "eval_initial.jsonl"
TABLE_ROWS = 8


@dataclass
class EvalArgs:
    """The held-out generation eval of a script that trains a policy (its --eval.* flags)."""

    num_prompts: int = 512
    """held-out prompts sampled at each evaluation (eval/score, eval/win_rate, eval/kl; eval/reward on toy); 0: none"""
    annotator: str | None = None
    """judge of the held-out samples, in --annotator's forms, or none; default: the training annotator (--online,
    rl_ppo.py), toy on the toy task, else none (then nothing is sampled)"""
    temperature: float = 1.0
    """sampling temperature of the held-out samples (1.0 measures the policy itself, not its mode)"""
    batch_size: int = 128
    """held-out prompts sampled at a time on each process"""


def win(preference: float | None) -> float | None:
    """The annotator's preference for the policy's response (1.0, 0.0, 0.5 a tie, or a probability) -> 1, 0 or 1/2."""
    if preference is None:
        return None
    return 0.5 if preference == 0.5 else float(preference > 0.5)


class HeldOutEval:
    """The module docstring's evaluation, for one run: `__call__(step, policy, reference, tracker)` -> metrics, with
    the sample table logged to the tracker (common.distributed.Tracker) and kept in `table`.
    Its first call at step 0 keeps the responses as the initial policy's; a first call at a later step (a resumed
    run) reads them from output_dir."""

    def __init__(
        self,
        prompt_records: list[dict],
        tokenizer,
        annotator,
        *,
        max_prompt_length: int,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        forward_batch_size: int,
        seed: int,
        output_dir: str,
        true_reward=None,
    ):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        prompt_records = prompt_records[: len(prompt_records) // world_size * world_size]  # equal shares: collectives
        rows = tokenize_records(prompt_records, tokenizer, max_prompt_length + 1, max_prompt_length)
        self.indices = list(range(rank, len(rows), world_size))  # this process's prompts
        self.rows = [rows[i] for i in self.indices]
        self.prompts = [prompt_records[i]["prompt"] for i in self.indices]  # as the data has them, for the annotator
        self.num_prompts, self.all_prompts = len(rows), [record["prompt"] for record in prompt_records]
        self.tokenizer, self.annotator, self.true_reward = tokenizer, annotator, true_reward
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.batch_size, self.forward_batch_size = batch_size, forward_batch_size
        self.path, self.initial = os.path.join(output_dir, INITIAL), None  # initial: {"response", "score"} per prompt
        self.calls = 0

    def load_initial(self) -> list[dict] | None:
        if not os.path.exists(self.path):
            print0(f"eval/win_rate is off: {self.path} (the initial policy's responses) is missing")
            return None
        with open(self.path) as f:
            kept = [json.loads(line) for line in f]
        if [line["prompt"] for line in kept] != self.all_prompts:
            fail(
                f"{self.path} holds the initial responses to other held-out prompts than this run's "
                "(--eval_dataset, --eval_split or --eval.num_prompts changed?); resume with the run's own flags"
            )
        return [kept[i] for i in self.indices]

    def save_initial(self, responses: list[str], scores: list):
        """Every process's initial responses and scores, in prompt order, written once by rank 0."""
        gathered = gather_objects(list(zip(self.indices, responses, scores)))
        if is_main():
            by_index = sorted(item for shard in gathered for item in shard)
            with open(self.path + ".tmp", "w") as f:
                for i, response, score in by_index:
                    f.write(json.dumps({"prompt": self.all_prompts[i], "response": response, "score": score}) + "\n")
            os.replace(self.path + ".tmp", self.path)
        self.initial = [{"response": r, "score": s} for r, s in zip(responses, scores)]

    @torch.no_grad()
    def __call__(self, step: int, policy, reference=None, tracker=None) -> dict:
        if self.calls == 0 and step > 0 and self.annotator is not None:
            self.initial = self.load_initial()
        self.calls += 1
        device = next(policy.parameters()).device
        generator = torch.Generator(device).manual_seed(self.seed)
        responses, sums, start = [], {}, time.perf_counter()
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id

        def add(name, value):
            sums[name] = sums.get(name, 0.0) + float(value)

        for first in range(0, len(self.rows), self.batch_size):  # the same number of batches on every process
            batch = collate(self.rows[first : first + self.batch_size], pad_id)
            prompt_ids, prompt_mask = batch["prompt_token_ids"].to(device), batch["prompt_attention_mask"].to(device)
            response_ids, response_mask = generate(
                policy,
                prompt_ids,
                prompt_mask,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                temperature=self.temperature,
                generator=generator,
            )
            ids = [row[mask.bool()].tolist() for row, mask in zip(response_ids.cpu(), response_mask.cpu())]
            responses += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            add("tokens", sum(map(len, ids)))
            add("eos", sum(r[-1:] == [eos_id] for r in ids))
            if reference is not None:
                add(
                    "kl", self.log_ratios(policy, reference, prompt_ids, prompt_mask, response_ids, response_mask).sum()
                )
        seconds, self.responses = time.perf_counter() - start, responses  # this process's, kept for a look
        if self.true_reward is not None:
            add("reward", sum(self.true_reward(p, r) for p, r in zip(self.prompts, responses)))

        scores = self.annotator.score(self.prompts, responses) if self.annotator is not None else []
        if self.annotator is not None and step == 0 and self.initial is None:  # before training: the initial policy
            self.save_initial(responses, scores)
        verdicts, asked, failed = self.verdicts(responses, scores) if self.initial is not None else ([], 0, 0)
        add("scored", sum(s is not None for s in scores))
        add("score", sum(s for s in scores if s is not None))
        add("judged", sum(v is not None for v in verdicts))
        add("wins", sum(v for v in verdicts if v is not None))
        add("annotations", len(scores) + asked)
        add("failed", sum(s is None for s in scores) + failed)

        totals, n = sum_over_processes(sums), self.num_prompts
        metrics = {
            "eval/response_length": totals["tokens"] / n,
            "eval/eos_rate": totals["eos"] / n,
            "eval/generated_tokens_per_s": totals["tokens"] / seconds,  # all processes' tokens, sampled in parallel
        }
        if "kl" in totals:
            metrics["eval/kl"] = totals["kl"] / n
        if "reward" in totals:
            metrics["eval/reward"] = totals["reward"] / n
        if self.annotator is not None:  # no score or win rate at all where every answer failed
            metrics["eval/failed"] = totals["failed"] / totals["annotations"]
            if totals["scored"] and not isinstance(self.annotator, ToyAnnotator):  # toy: its score is eval/reward
                metrics["eval/score"] = totals["score"] / totals["scored"]
        if totals["judged"]:
            metrics["eval/win_rate"] = totals["wins"] / totals["judged"]
        self.table = [
            {
                "prompt": as_text(prompt)[-500:],
                "response": response,
                "initial_response": initial["response"] if initial else None,
                "score": score,
                "initial_score": initial["score"] if initial else None,
                "verdict": verdict,
            }
            for prompt, response, score, initial, verdict in zip(
                self.prompts[:TABLE_ROWS],
                responses,
                scores or [None] * TABLE_ROWS,
                self.initial or [None] * TABLE_ROWS,
                verdicts or [None] * TABLE_ROWS,
            )
        ]
        if tracker is not None:
            tracker.log_table(step, "eval_samples", self.table)
        return metrics

    def log_ratios(self, policy, reference, *inputs) -> torch.Tensor:
        """log pi(y|x) - log ref(y|x) of each response, (B,), in forwards of forward_batch_size responses (training's
        micro-batch: a size known to fit)."""
        chunks = []
        for i in range(0, len(inputs[0]), self.forward_batch_size):
            part = [x[i : i + self.forward_batch_size] for x in inputs]
            with adapters_off(reference):  # with LoRA, the policy with its adapters off
                reference_logps = shared_prompt_logps(reference, *part).sum(-1)
            chunks.append(shared_prompt_logps(policy, *part).sum(-1) - reference_logps)
        return torch.cat(chunks)

    def verdicts(self, responses: list[str], scores: list) -> tuple[list[float | None], int, int]:
        """1, 0 or 1/2 per prompt: the policy's response against the initial one (None where the annotator failed);
        and how many pairs a judge was asked, and failed on."""
        initial = [item["response"] for item in self.initial]
        differ = [i for i, (a, b) in enumerate(zip(responses, initial)) if a != b]
        verdicts = [0.5] * len(responses)  # the same response: a tie, not asked
        if self.annotator.pairwise:  # a judge, asked both orders
            preferences = self.annotator.prefer(
                [self.prompts[i] for i in differ], [responses[i] for i in differ], [initial[i] for i in differ]
            )
        else:  # the annotator prefers the higher score: compare with the stored one
            preferences = [
                None
                if scores[i] is None or self.initial[i]["score"] is None
                else 0.5
                if scores[i] == self.initial[i]["score"]
                else float(scores[i] > self.initial[i]["score"])
                for i in differ
            ]
        for i, preference in zip(differ, preferences):
            verdicts[i] = win(preference)
        if not self.annotator.pairwise:  # its verdicts are comparisons of scores, not more answers
            return verdicts, 0, 0
        return verdicts, len(differ), sum(p is None for p in preferences)


def held_out_eval(args, tokenizer, device, dtype, annotator=None, annotator_spec=None) -> HeldOutEval | None:
    """The script's HeldOutEval, from args.eval (EvalArgs) and the flags every script that trains a policy shares
    (dataset, eval_dataset, eval_split, max_prompt_length, generation, per_device_batch_size, seed, output_dir, judge);
    `annotator` is the script's training annotator (online, rl_ppo.py), made from `annotator_spec`, if any.

    The eval annotator: --eval.annotator, or by default the training annotator, the toy annotator on the toy task,
    else none. With none (and not on the toy task), nothing is sampled: None."""
    spec = args.eval.annotator
    if spec is None:
        eval_annotator = annotator or (ToyAnnotator() if toy.is_toy(args.dataset) else None)
    elif spec == "none":
        eval_annotator = None
    elif annotator is not None and spec == annotator_spec:
        eval_annotator = annotator  # one reward model or judge in memory, not two
    else:
        eval_annotator = make_annotator(spec, device, args.judge, dtype)
    if eval_annotator is None and not toy.is_toy(args.dataset):
        print0("no held-out generation eval: no --eval.annotator to judge the samples (eval/score, eval/win_rate)")
        return None
    records = load_eval_records(args.dataset, args.eval_dataset, args.eval_split, "prompt", args.eval.num_prompts)
    if not records or len(records) < dist.get_world_size():  # num_prompts 0, or not one prompt per process
        print0(
            f"no held-out generation eval: {len(records or [])} held-out prompts for {dist.get_world_size()} processes"
        )
        return None
    held_out = HeldOutEval(
        records,
        tokenizer,
        eval_annotator,
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.generation.max_new_tokens,
        temperature=args.eval.temperature,
        batch_size=args.eval.batch_size,
        forward_batch_size=args.per_device_batch_size,
        seed=args.seed,
        output_dir=args.output_dir,
        true_reward=toy.true_reward if toy.is_toy(args.dataset) else None,
    )
    print0(
        f"held-out generation eval: {held_out.num_prompts} prompts every {args.eval_every} steps, judged by "
        f"{type(eval_annotator).__name__ if eval_annotator else 'no annotator'}"
    )
    return held_out
