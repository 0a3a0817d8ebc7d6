"""Reweighters: factors worked out by hand, weights multiplied (never replaced), input rows left alone, the
python form's checks on what the user function returns, and the counts behind the logged metrics."""

import copy

import pytest

from common.reweight import make_reweighter
from conftest import read_metrics, run_script


def pair_row(weight=1.0, **extra):
    """A pairwise row as common.batch builds it; `extra` adds or replaces fields (e.g. preference=0.75)."""
    return {
        "prompt": "dbca=",
        "prompt_ids": [1, 2, 3],
        "generation1_response_only": "abcd",
        "generation1_response_ids": [4, 5],
        "generation1_reward": 1.0,
        "generation1_weight": weight,
        "generation2_response_only": "abdc",
        "generation2_response_ids": [4, 6],
        "generation2_reward": 0.0,
        "generation2_weight": weight,
    } | extra


def weights(rows):
    return [(r["generation1_weight"], r["generation2_weight"]) for r in rows]


def test_confidence_factors_multiply_the_data_weights():
    """factor = |2p - 1|: p = 1.0 -> 1, 0.0 -> 1, 0.75 -> 0.5, 0.5 -> 0. The last row has a dataset weight of 0.5,
    so its weights become 0.5 * |2 * 0.75 - 1| = 0.25. A failed verdict (None) gets factor 0."""
    rows = [pair_row(preference=p) for p in (1.0, 0.0, 0.75, 0.5)] + [
        pair_row(0.5, preference=0.75),
        pair_row(preference=None),
    ]
    before = copy.deepcopy(rows)
    reweighter = make_reweighter("confidence")
    out = reweighter(rows)
    assert weights(out) == [(1.0, 1.0), (1.0, 1.0), (0.5, 0.5), (0.0, 0.0), (0.25, 0.25), (0.0, 0.0)]
    assert rows == before  # the input rows are not changed
    assert [r["generation1_response_ids"] for r in out] == [[4, 5]] * 6  # everything but the weights is kept
    assert {k for r in out for k in r} == {k for r in rows for k in r}
    # stats: 6 rows, factors sum to 1 + 1 + 0.5 + 0 + 0.5 + 0 = 3, two rows with factor 0
    assert reweighter.stats == {"rows": 6, "factor_sum": 3.0, "zero_factor": 2}
    metrics = reweighter.metrics(reweighter.stats)
    assert metrics == {"reweight/mean_factor": 0.5, "reweight/zero_fraction": pytest.approx(2 / 6)}
    assert reweighter.metrics(reweighter.stats) == metrics  # reading the stats does not change them
    reweighter(rows[:1])  # the stats describe the latest call (one step) only
    assert reweighter.stats == {"rows": 1, "factor_sum": 1.0, "zero_factor": 0}
    assert reweighter.metrics({}) == {"reweight/mean_factor": 0.0, "reweight/zero_fraction": 0.0}  # no division by 0


def test_metrics_from_counts_summed_over_processes():
    """Two processes' stats, summed by the caller: 10 rows, factors summing to 4, 3 zeros -> mean 0.4, zero
    fraction 0.3."""
    reweighter = make_reweighter("confidence")
    reweighter([pair_row(preference=1.0)])
    totals = {"rows": 10, "factor_sum": 4.0, "zero_factor": 3}
    assert reweighter.metrics(totals) == {"reweight/mean_factor": 0.4, "reweight/zero_fraction": 0.3}


def test_confidence_needs_online_pairwise_rows():
    with pytest.raises(SystemExit, match="needs the annotator's preference probability.*--online") as e:
        make_reweighter("confidence")([pair_row(preference=1.0), pair_row()])
    assert "\n" not in str(e.value)


def test_none_and_unknown_specs():
    assert make_reweighter("none") is None
    for spec in ("confident", "python:only_module", "python::f", ""):
        with pytest.raises(SystemExit, match="accepted forms: none, confidence, python:MODULE:FUNCTION"):
            make_reweighter(spec)


@pytest.fixture
def weights_module(tmp_path, monkeypatch):
    (tmp_path / "reweight_test_factors.py").write_text(
        "import torch\n"
        "def by_length(rows):\n"
        "    rows[0]['prompt_ids'].append(99)  # must not reach the caller's rows\n"
        "    return torch.tensor([float(len(r['generation1_response_only'])) for r in rows])\n"
        "def as_tuple(rows): return tuple(0.5 for _ in rows)\n"
        "def not_a_list(rows): return {'a': 1.0}\n"
        "def too_short(rows): return [1.0] * (len(rows) - 1)\n"
        "def matrix(rows): return torch.ones(len(rows), 1)\n"
        "def negative(rows): return [1.0] * (len(rows) - 1) + [-1.0]\n"
        "def nan(rows): return [float('nan')] * len(rows)\n"
        "def inf(rows): return [float('inf')] * len(rows)\n"
        "def text(rows): return ['1'] * len(rows)\n"
    )
    monkeypatch.chdir(tmp_path)
    return "reweight_test_factors"


def test_python_function(weights_module):
    """by_length: factor = number of characters of generation1's response: "ab" -> 2, "abcd" -> 4; the second row's
    dataset weight 0.25 gives 0.25 * 4 = 1. Offline rows have no preference: the python form does not need one."""
    rows = [pair_row(generation1_response_only="ab"), pair_row(weight=0.25)]
    before = copy.deepcopy(rows)
    reweighter = make_reweighter(f"python:{weights_module}:by_length")
    assert weights(reweighter(rows)) == [(2.0, 2.0), (1.0, 1.0)]
    assert rows == before  # the function changed its copies only
    assert reweighter.metrics(reweighter.stats) == {"reweight/mean_factor": 3.0, "reweight/zero_fraction": 0.0}
    assert weights(make_reweighter(f"python:{weights_module}:as_tuple")(rows)) == [(0.5, 0.5), (0.125, 0.125)]


@pytest.mark.parametrize(
    "function, problem",
    [
        ("not_a_list", "got dict"),
        ("too_short", "got list of length 1"),
        ("matrix", "got a 2-D tensor"),
        ("negative", "got -1.0"),
        ("nan", "got nan"),
        ("inf", "got inf"),
        ("text", "got '1'"),
    ],
)
def test_python_function_bad_returns(weights_module, function, problem):
    with pytest.raises(SystemExit, match="must return one factor per row") as e:
        make_reweighter(f"python:{weights_module}:{function}")([pair_row(), pair_row()])
    assert problem in str(e.value) and "2 finite numbers >= 0" in str(e.value)
    assert "\n" not in str(e.value)


def test_python_missing_module_or_function(weights_module):
    with pytest.raises(SystemExit, match="module 'reweight_test_factors' has no function 'nope'"):
        make_reweighter(f"python:{weights_module}:nope")
    with pytest.raises(SystemExit, match="cannot import module 'no_such_weights_module'"):
        make_reweighter("python:no_such_weights_module:f")


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo_pairwise.py", "kto_pointwise.py"])
def test_scripts_train_on_the_reweighted_examples(tmp_path, script):
    """--reweighter python:...: factors of 0 for every example leave nothing to learn from, so every script's
    loss and gradient are exactly 0; confidence weighting needs --online (a one-line error, before any work)."""
    (tmp_path / "zero_weights.py").write_text("def f(rows):\n    return [0.0] * len(rows)\n")
    run_script(
        script,
        "--reweighter",
        "python:zero_weights:f",
        "--max_steps",
        "3",
        "--log_every",
        "1",
        "--eval_every",
        "1000",
        "--output_dir",
        str(tmp_path / "run"),
        env={"PYTHONPATH": str(tmp_path)},
    )
    metrics = read_metrics(tmp_path / "run")
    logged = [m for m in metrics if "train/loss" in m]
    assert len(logged) == 3 and all(m["train/loss"] == 0.0 and m["train/grad_norm"] == 0.0 for m in logged)
    assert [m["reweight/mean_factor"] for m in metrics if "reweight/mean_factor" in m] == [0.0] * 3
    # the names every script logs for the same things, and one JSON object per logged step
    assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s"} <= set(logged[0])
    assert script == "sft.py" or "rewards/margins" in logged[0]
    assert script not in ("reward_model.py", "dpo_pairwise.py") or "rewards/accuracies" in logged[0]
    assert len({m["step"] for m in metrics}) == len(metrics)
    if script == "dpo_pairwise.py":
        failed = run_script(
            script, "--reweighter", "confidence", "--output_dir", str(tmp_path / "offline"), check=False
        )
        assert failed.returncode != 0 and "only --online pairs have" in failed.stderr.strip().splitlines()[-1]
