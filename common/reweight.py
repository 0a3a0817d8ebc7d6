"""SampleReweighters: how much each example of a step counts in the loss.

Per step: prompts -> generate -> annotate -> reweight -> loss (DESIGN.md). A reweighter is called on the token
rows of one optimizer step on one process, after annotation and before collation (rows as common.batch's
tokenize_records and OnlineBatchFactory build them), and returns new rows: shallow copies whose every
f"{g}_weight" is the old weight times the row's factor. The input rows are never changed (offline rows are
served again every epoch), and a dataset's weight column composes with the reweighting.

The losses multiply each example's term by its weight and divide by a count of examples (pairs; response
tokens in sft.py), not by the sum of the weights. So a mean factor below 1 also scales the gradient down,
like a lower learning rate would under SGD. AdamW divides by a running RMS of the gradient, so a constant
scale mostly cancels there, but a step whose mean factor is below the recent ones still takes a smaller step.

Kinds, chosen by `make_reweighter(spec)` (a script's --reweighter):
    none                     no reweighter (make_reweighter returns None): weights stay as the data has them
    confidence               online pairwise rows: factor = |2 * preference - 1|, where "preference" is the
                             annotator's probability that generation1 is better: 1 for a sure verdict, 0 for a
                             coin flip, so pairs the annotator is unsure about count less. A failed verdict
                             (preference None; such rows already have weight 0) gets factor 0.
    python:MODULE:FUNCTION   FUNCTION(rows) -> one factor >= 0 per row (list, tuple or 1-D tensor); it gets
                             copies of the rows, so it cannot change them
`stats` describes the latest call (one step on this process): rows, factor_sum and zero_factor (rows with factor 0);
`metrics(totals)` turns those counts, summed over processes, into the logged reweight/* metrics.
"""

import collections
import copy
import math
import numbers

import torch

from common.batch import GENERATIONS
from common.distributed import fail, import_function

FORMS = "none, confidence, python:MODULE:FUNCTION"


class Reweighter:
    """Callable: rows -> new rows with their weights multiplied by `factors(rows)`. Subclasses write `factors`."""

    def __init__(self):
        self.stats = collections.Counter()

    def __call__(self, rows: list[dict]) -> list[dict]:
        factors = self.factors(rows)
        self.stats = collections.Counter(
            rows=len(rows), factor_sum=sum(factors), zero_factor=sum(f == 0 for f in factors)
        )
        reweighted = []
        for row, factor in zip(rows, factors):
            row = dict(row)
            for g in GENERATIONS:
                if f"{g}_weight" in row:
                    row[f"{g}_weight"] = row[f"{g}_weight"] * factor
            reweighted.append(row)
        return reweighted

    def factors(self, rows: list[dict]) -> list[float]:
        raise NotImplementedError

    @staticmethod
    def metrics(totals: dict) -> dict:
        """reweight/* from `stats` summed over processes (common.distributed.sum_over_processes)."""
        rows = max(totals.get("rows", 0), 1)
        return {
            "reweight/mean_factor": totals.get("factor_sum", 0) / rows,
            "reweight/zero_fraction": totals.get("zero_factor", 0) / rows,
        }


class ConfidenceReweighter(Reweighter):
    def factors(self, rows):
        if any("preference" not in row for row in rows):
            fail(
                "--reweighter confidence needs the annotator's preference probability, which only online pairwise "
                "rows have (--online)"
            )
        return [0.0 if row["preference"] is None else abs(2 * row["preference"] - 1) for row in rows]


class PythonReweighter(Reweighter):
    """A user function of the rows, e.g. one that down-weights pairs whose responses are nearly identical."""

    def __init__(self, module: str, function: str):
        super().__init__()
        self.name = f"python:{module}:{function}"
        self.function = import_function(f"--reweighter {self.name}", module, function)

    def factors(self, rows):
        values = self.function(copy.deepcopy(rows))  # deep: the token id lists of offline rows are reused every epoch
        expected = (
            f"--reweighter {self.name} must return one factor per row "
            f"(a list, tuple or 1-D tensor of {len(rows)} finite numbers >= 0)"
        )
        if isinstance(values, torch.Tensor) and values.dim() != 1:
            fail(f"{expected}, got a {values.dim()}-D tensor")
        values = values.tolist() if isinstance(values, torch.Tensor) else values
        if not isinstance(values, (list, tuple)) or len(values) != len(rows):
            fail(
                f"{expected}, got {type(values).__name__}"
                + (f" of length {len(values)}" if isinstance(values, (list, tuple)) else "")
            )
        bad = [v for v in values if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0)]
        if bad:
            fail(f"{expected}, got {bad[0]!r}")
        return [float(v) for v in values]


def make_reweighter(spec: str) -> Reweighter | None:
    """The reweighter named by `spec` (see the module docstring), or None for "none"."""
    if spec == "none":
        return None
    if spec == "confidence":
        return ConfidenceReweighter()
    kind, _, rest = spec.partition(":")
    module, _, function = rest.partition(":")
    if kind == "python" and module and function:
        return PythonReweighter(module, function)
    fail(f"unknown --reweighter '{spec}'; accepted forms: {FORMS}")
