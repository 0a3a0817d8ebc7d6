"""SampleReweighters: how much each example of a step counts in the loss.

Per step: prompts -> generate -> annotate -> reweight -> loss (DESIGN.md). Two moments to reweight:
1. From the rows, before collation (none, confidence, python:M:F with one argument): called on the token rows of
   one optimizer step on one process (as common.batch's tokenize_records and common.online's OnlineSampler build
   them); returns shallow copies whose every f"{g}_weight" is the old weight times the row's factor. The input rows
   are never changed (offline rows are served again every epoch), and a dataset's weight column composes with the
   factor. Rows that only fill an online step (trainable False) keep their weight 0 and are not counted.
2. From the current policy, in the loop (policy, importance:PATH, python:M:F with two arguments): after the forward
   the loss already runs and before the loss, `policy_factors(batch, policy)` gets that forward's per-token
   log-probs, detached, and returns one factor per example (B,), which the script multiplies into the weights.
   `policy` is the forward's per-token view (common.logps' with_stats): {"logps": (B * n, T) log pi(y_t | x, y_<t),
   "log_p2": (B * n, T) log sum_v pi(v | x, y_<t)^2, "entropy", "mask": (B * n, T)} with example i's n responses
   (2 for pairs) at rows i*n .. i*n + n - 1, zero at padding.
   This is what counters the distribution shift of offline data: its responses come from another model rho, and
   as the policy pi moves away from rho, much of that data describes behaviour pi no longer has.

The losses multiply each example's term by its weight and divide by a count of examples (pairs; response
tokens in sft.py), not by the sum of the weights. So a mean factor below 1 also scales the gradient down,
like a lower learning rate would under SGD. AdamW divides by a running RMS of the gradient, so a constant
scale mostly cancels there, but a step whose mean factor is below the recent ones still takes a smaller step.
A `self_normalised` kind (importance) removes that scale: the script divides the step's gradients by the factors'
mean over every micro-batch on every process, the same as dividing each factor by it (exact under any split).

Kinds, chosen by `make_reweighter(spec)` (a script's --reweighter; a script refuses in one line the kinds it cannot
use: confidence needs online pairs, policy and importance a policy and offline data, so sft.py, dpo_pairwise.py and
kto_pointwise.py take them, rl_ppo.py takes python functions, reward_model.py the rows form):
    none                     no reweighter (make_reweighter returns None): weights stay as the data has them
    confidence               online pairwise rows: factor = |2 * preference - 1|, where "preference" is the
                             annotator's probability that generation1 is better: 1 for a sure verdict, 0 for a
                             coin flip, so pairs the annotator is unsure about count less. A failed verdict
                             (preference None; such rows already have weight 0) gets factor 0.
    policy                   WPO (Zhou et al. 2024, eq. 2, https://arxiv.org/abs/2406.11827): each response's
                             probability under the policy, length-normalised and aligned so that a sample of the
                             policy itself has weight about 1 whatever its entropy (greedy-ish distributions would
                             otherwise dominate): w(x, y) = exp(mean_t [log pi(y_t | .) - log sum_v pi(v | .)^2]);
                             a pair's factor is w(x, y_1) * w(x, y_2). TRL's use_weighting clamps the pair's
                             factor at 1; we keep the paper's product (factors above 1 are logged by mean_factor).
                             Online samples are the policy's own: there it only tells typical samples from rare.
    importance:PATH          truncated, self-normalised importance weights against a behaviour model rho (a
                             causal LM with the policy's tokenizer: the model that wrote the data, or the SFT model
                             fitted to it): factor = min(pi(y|x) / rho(y|x), IMPORTANCE_CLIP), the product over a
                             pair's two responses (the pair's probability), then divided by the step's mean factor.
                             rho's log-probs are computed once before training, as the reference's are, into a
                             table of the reweighter's own that the batch's `index` (its dataset row) reads. Offline
                             only (online samples come from pi itself). sft.py's loss is a token mean, and its
                             divisor is still the examples' mean factor, not a token-weighted one.
    python:MODULE:FUNCTION   FUNCTION(rows) -> one factor >= 0 per row (list, tuple or 1-D tensor), at collation;
                             or FUNCTION(batch, policy) -> one factor >= 0 per example, in the loop (the form
                             rl_ppo.py takes: its batch is the micro-batch of the update). It gets copies, so it
                             cannot change what it is given.
`stats` counts one step on this process (rows, factor_sum, factor_squares, zero_factor, clipped; the policy kinds add
up their micro-batches); `metrics(totals)` turns those counts, summed over processes, into the logged reweight/*:
mean_factor, zero_fraction and ess, the effective sample size (sum f)^2 / sum f^2 of the step's factors.
"""

import collections
import copy
import inspect
import math
import numbers
import time

import torch

from common.batch import GENERATIONS
from common.distributed import prepare_model, print0, sum_over_processes
from common.flags import fail, import_function

REWEIGHTERS = {  # kind -> its form on the command line
    "none": "none",
    "confidence": "confidence",
    "policy": "policy",
    "importance": "importance:PATH",
    "python": "python:MODULE:FUNCTION",
}
IMPORTANCE_CLIP = 5.0  # importance:PATH truncates pi / rho here, before self-normalising


class Reweighter:
    """Callable: rows -> new rows with their weights multiplied by `factors(rows)`. Subclasses write `factors`, or,
    those that see the policy (`sees_policy`), `policy_factors`, and their call at collation only starts a step."""

    sees_policy = False  # factors from the policy's forward, in the loop
    self_normalised = False  # the script divides the step's gradients by the step's mean factor
    behaviour_path = None  # a model whose log-probs of the data `prepare` stores (importance)

    def __init__(self):
        self.stats = collections.Counter()

    def __call__(self, rows: list[dict]) -> list[dict]:
        self.stats = collections.Counter()  # a new step (the policy kinds' micro-batches add theirs up in the loop)
        if self.sees_policy:
            return rows
        trainable = [i for i, row in enumerate(rows) if row.get("trainable", True)]
        factors = dict(zip(trainable, self.factors([rows[i] for i in trainable])))
        self.count(torch.tensor(list(factors.values()), dtype=torch.float64))
        reweighted = []
        for i, row in enumerate(rows):
            row = dict(row)
            for g in GENERATIONS:
                if f"{g}_weight" in row:
                    row[f"{g}_weight"] = row[f"{g}_weight"] * factors.get(i, 1.0)
            reweighted.append(row)
        return reweighted

    def factors(self, rows: list[dict]) -> list[float]:
        raise NotImplementedError

    def policy_factors(self, batch: dict, policy: dict, num_examples: int) -> torch.Tensor:
        raise NotImplementedError

    def reweigh(self, batch: dict, policy: dict, weights: torch.Tensor) -> torch.Tensor:
        """weights (B,) times the policy's factors, as constants (no gradient flows through a factor)."""
        with torch.no_grad():
            factors = self.policy_factors(batch, policy, len(weights)).to(weights.dtype)
        trainable = batch.get("trainable", torch.ones_like(weights, dtype=torch.bool))
        self.count(factors[trainable])  # examples that only fill an online step do not count
        return weights * factors

    def count(self, factors: torch.Tensor):
        factors = factors.double()
        self.stats.update(
            rows=len(factors),
            factor_sum=factors.sum().item(),
            factor_squares=(factors**2).sum().item(),
            zero_factor=(factors == 0).sum().item(),
        )

    def mean_factor(self) -> float:
        """The step's mean factor over every process (a collective: every process calls it)."""
        totals = sum_over_processes(self.stats)
        return totals.get("factor_sum", 0) / max(totals.get("rows", 0), 1)

    @staticmethod
    def metrics(totals: dict) -> dict:
        """reweight/* from `stats` summed over processes (common.distributed.sum_over_processes)."""
        rows = max(totals.get("rows", 0), 1)
        metrics = {
            "reweight/mean_factor": totals.get("factor_sum", 0) / rows,
            "reweight/zero_fraction": totals.get("zero_factor", 0) / rows,
            "reweight/ess": totals.get("factor_sum", 0) ** 2 / max(totals.get("factor_squares", 0), 1e-30),
        }
        if "clipped" in totals:
            metrics["reweight/clipped_fraction"] = totals["clipped"] / rows
        return metrics


def sequences(policy: dict, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of each example's responses, (B, n) each."""
    shape = (num_examples, -1)
    return policy["logps"].sum(-1).view(shape), policy["mask"].sum(-1).view(shape)


class ConfidenceReweighter(Reweighter):
    def factors(self, rows):
        if any("preference" not in row for row in rows):
            fail(
                "--reweighter confidence needs the annotator's preference probability, which only online pairwise "
                "rows have (--online)"
            )
        return [0.0 if row["preference"] is None else abs(2 * row["preference"] - 1) for row in rows]


class WPOReweighter(Reweighter):
    """--reweighter policy: w(x, y) = exp(mean_t [log pi(y_t | .) - log sum_v pi(v | .)^2]), a pair's the product."""

    sees_policy = True

    def policy_factors(self, batch, policy, num_examples):
        aligned = {"logps": policy["logps"] - policy["log_p2"], "mask": policy["mask"]}  # zero at padding
        sums, lengths = sequences(aligned, num_examples)
        return (sums / lengths.clamp(min=1)).sum(-1).exp()


class ImportanceReweighter(Reweighter):
    """--reweighter importance:PATH: min(pi(y|x) / rho(y|x), IMPORTANCE_CLIP), a pair's of both responses, then
    self-normalised over the step."""

    sees_policy, self_normalised = True, True

    def __init__(self, path: str):
        super().__init__()
        self.behaviour_path = path
        self.behaviour_logps = None  # (dataset rows, G): rho's summed log-prob of each response (`prepare`)

    def policy_factors(self, batch, policy, num_examples):
        logps, _ = sequences(policy, num_examples)  # (B, n)
        if self.behaviour_logps is None or "index" not in batch:
            fail(f"--reweighter importance:{self.behaviour_path}: no behaviour log-probs for this batch (offline only)")
        behaviour = self.behaviour_logps[batch["index"].cpu()].to(logps.device)
        ratios = torch.exp((logps.double() - behaviour.double()).sum(-1))
        self.stats.update(clipped=(ratios > IMPORTANCE_CLIP).sum().item())
        return ratios.clamp(max=IMPORTANCE_CLIP)

    def prepare(self, rows: list[dict], indices: list[int], tokenizer, device, dtype, batch_size: int):
        """rho's summed log-prob of each response of the rows at `indices` (those the run will train on), once,
        before training, into `behaviour_logps`."""
        from common.logps import precompute_logps
        from common.model import load_causal_lm, load_tokenizer

        if load_tokenizer(self.behaviour_path).get_vocab() != tokenizer.get_vocab():
            fail(
                f"--reweighter importance:{self.behaviour_path}: its tokenizer differs from the policy's, so their "
                "log-probs of a response are not comparable; pass a behaviour model with the policy's tokenizer"
            )
        start = time.perf_counter()
        behaviour = load_causal_lm(self.behaviour_path, tokenizer, device)
        behaviour = prepare_model(behaviour, device, dtype, trainable=False)
        used = precompute_logps(behaviour.eval(), [rows[i] for i in indices], tokenizer.pad_token_id, batch_size)
        self.behaviour_logps = torch.full((len(rows), used.shape[1]), math.nan)
        self.behaviour_logps[indices] = used
        seconds = time.perf_counter() - start
        print0(f"behaviour log-probs of {len(indices)} examples under {self.behaviour_path} in {seconds:.1f} s")


class PythonReweighter(Reweighter):
    """A user function of the rows, e.g. one that down-weights pairs whose responses are nearly identical; or of
    (batch, policy), in the loop."""

    def __init__(self, module: str, function: str):
        super().__init__()
        self.name = f"python:{module}:{function}"
        self.function = import_function(f"--reweighter {self.name}", module, function)
        try:
            parameters = inspect.signature(self.function).parameters
        except (TypeError, ValueError):  # a builtin without a signature: the rows form
            parameters = {}
        self.sees_policy = len(parameters) >= 2

    def factors(self, rows):
        return self.check(self.function(copy.deepcopy(rows)), len(rows))  # deep: offline rows' ids are reused

    def policy_factors(self, batch, policy, num_examples):
        batch = {
            key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in batch.items()
        }
        values = self.function(batch, {key: value.clone() for key, value in policy.items()})
        return torch.tensor(self.check(values, num_examples), device=policy["logps"].device)

    def check(self, values, count: int) -> list[float]:
        expected = (
            f"--reweighter {self.name} must return one factor per "
            f"{'example' if self.sees_policy else 'row'} (a list, tuple or 1-D tensor of {count} finite numbers >= 0)"
        )
        if isinstance(values, torch.Tensor) and values.dim() != 1:
            fail(f"{expected}, got a {values.dim()}-D tensor")
        values = values.tolist() if isinstance(values, torch.Tensor) else values
        if not isinstance(values, (list, tuple)) or len(values) != count:
            fail(
                f"{expected}, got {type(values).__name__}"
                + (f" of length {len(values)}" if isinstance(values, (list, tuple)) else "")
            )
        bad = [v for v in values if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0)]
        if bad:
            fail(f"{expected}, got {bad[0]!r}")
        return [float(v) for v in values]


def self_normalise(reweighter: Reweighter | None, model) -> float:
    """Where the reweighter is self-normalised (importance), divide the step's gradients by the step's mean factor over
    every micro-batch on every process: the same as dividing each factor by it, whatever the split. Returns the
    divisor (1 for other reweighters, and when every factor is 0: then there is no gradient to scale)."""
    if reweighter is None or not reweighter.self_normalised:
        return 1.0
    mean = reweighter.mean_factor()
    if mean == 0:
        return 1.0
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.div_(mean)
    return mean


def make_reweighter(spec: str) -> Reweighter | None:
    """The reweighter named by `spec` (see the module docstring), or None for "none"."""
    if spec == "none":
        return None
    if spec == "confidence":
        return ConfidenceReweighter()
    if spec == "policy":
        return WPOReweighter()
    kind, _, rest = spec.partition(":")
    if kind == "importance" and rest:
        return ImportanceReweighter(rest)
    module, _, function = rest.partition(":")
    if kind == "python" and module and function:
        return PythonReweighter(module, function)
    fail(f"unknown --reweighter '{spec}'; accepted forms: {', '.join(REWEIGHTERS.values())}")


def check_reweighter(spec: str, takes: tuple[str, ...], script: str, why: str = ""):
    """Stop in one line, before any work, where the script does not take this kind of --reweighter (`takes`: the
    kinds it does, of REWEIGHTERS; `why`: the reason, said after them)."""
    if spec.partition(":")[0] not in takes:
        fail(f"--reweighter {spec}: {script} takes {', '.join(REWEIGHTERS[kind] for kind in takes)}{why}")
