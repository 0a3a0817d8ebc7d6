"""Reweighters: factors worked out by hand, weights multiplied (never replaced), input rows left alone, the
python form's checks on what the user function returns, and the counts behind the logged metrics."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from common.logps import position_stats
from common.model import load_tokenizer
from common.reweight import make_reweighter, self_normalise
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
    assert reweighter.stats == {"rows": 6, "factor_sum": 3.0, "factor_squares": 2.5, "zero_factor": 2}
    metrics = reweighter.metrics(reweighter.stats)
    assert metrics == {
        "reweight/mean_factor": 0.5,
        "reweight/zero_fraction": pytest.approx(2 / 6),
        "reweight/ess": 3.6,  # (sum f)^2 / sum f^2 = 9 / 2.5: 6 rows count as 3.6
    }
    assert reweighter.metrics(reweighter.stats) == metrics  # reading the stats does not change them
    reweighter(rows[:1])  # the stats describe the latest call (one step) only
    assert reweighter.stats == {"rows": 1, "factor_sum": 1.0, "factor_squares": 1.0, "zero_factor": 0}
    no_rows = {"reweight/mean_factor": 0.0, "reweight/zero_fraction": 0.0, "reweight/ess": 0.0}
    assert reweighter.metrics({}) == no_rows  # no division by 0


def test_metrics_from_counts_summed_over_processes():
    """Two processes' stats, summed by the caller: 10 rows, factors summing to 4, 3 zeros -> mean 0.4, zero
    fraction 0.3."""
    reweighter = make_reweighter("confidence")
    reweighter([pair_row(preference=1.0)])
    totals = {"rows": 10, "factor_sum": 4.0, "factor_squares": 2.0, "zero_factor": 3}
    assert reweighter.metrics(totals) == {
        "reweight/mean_factor": 0.4,
        "reweight/zero_fraction": 0.3,
        "reweight/ess": 8.0,  # (sum f)^2 / sum f^2 = 16 / 2
    }


def test_confidence_needs_online_pairwise_rows():
    with pytest.raises(SystemExit, match="needs the annotator's preference probability.*--online") as e:
        make_reweighter("confidence")([pair_row(preference=1.0), pair_row()])
    assert "\n" not in str(e.value)


def test_none_and_unknown_specs():
    assert make_reweighter("none") is None
    for spec in ("confident", "python:only_module", "python::f", "", "importance:", "policies"):
        with pytest.raises(SystemExit, match="accepted forms: none, confidence, policy, importance:PATH, python:M"):
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
    assert reweighter.metrics(reweighter.stats) == {
        "reweight/mean_factor": 3.0,
        "reweight/zero_fraction": 0.0,
        "reweight/ess": 36 / 20,  # factors 2 and 4
    }
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
        *([] if script == "reward_model.py" else ["--eval.num_prompts", "16"]),
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


# reweighters that see the policy: factors from the forward the loss runs, in the loop


def seen_pairs():
    """Two pairs (n = 2 responses each, a pair's rows adjacent), per-token log-probs and log sum_v p_v^2 written out:
    pair 0: response a: logps [-0.5, -1.0], log_p2 [-0.3, -0.6]    -> aligned mean (-0.2 - 0.4) / 2 = -0.3
            response b: logps [-2.0, pad],  log_p2 [-1.0, pad]     -> aligned mean -1.0
    pair 1: response a: logps [-0.1, -0.1], log_p2 [-0.1, -0.3]    -> aligned mean (0 + 0.2) / 2 = 0.1
            response b: logps [-0.4, -0.2], log_p2 [-0.2, -0.2]    -> aligned mean (-0.2 + 0) / 2 = -0.1"""
    logps = torch.tensor([[-0.5, -1.0], [-2.0, 0.0], [-0.1, -0.1], [-0.4, -0.2]])
    log_p2 = torch.tensor([[-0.3, -0.6], [-1.0, 0.0], [-0.1, -0.3], [-0.2, -0.2]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    return {"logps": logps, "log_p2": log_p2, "mask": mask}


def test_wpo_factors_by_hand():
    """WPO: w(x, y) = exp(aligned mean); a pair's factor the product: exp(-0.3 - 1.0), exp(0.1 - 0.1) = 1. With
    dataset weights 0.5 and 1: 0.5 * exp(-1.3) and 1. Single responses (n = 1): each row its own factor."""
    reweighter = make_reweighter("policy")
    assert reweighter.sees_policy and not reweighter.self_normalised
    reweighter([pair_row(), pair_row()])  # the collation call only starts the step: rows as they are
    weights = reweighter.reweigh({}, seen_pairs(), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([0.5 * math.exp(-1.3), 1.0]))
    singles = reweighter.reweigh({}, seen_pairs(), torch.ones(4))
    torch.testing.assert_close(singles, torch.tensor([-0.3, -1.0, 0.1, -0.1]).exp())
    stats = reweighter.stats  # both calls of the step add up
    assert stats["rows"] == 6 and stats["factor_sum"] == pytest.approx(math.exp(-1.3) + 1 + singles.sum().item())


def test_wpo_alignment_makes_on_policy_tokens_weigh_one():
    """position_stats by hand: p = softmax([0, ln 3]) = [1/4, 3/4]: log_p2 = log(1/16 + 9/16) = log(5/8), entropy
    = -(1/4 log 1/4 + 3/4 log 3/4). WPO's aligned weight p(y) / sum_v p_v^2 has mean 1 under p itself:
    1/4 * (1/4) / (5/8) + 3/4 * (3/4) / (5/8) = 1, however peaked p is (the paper's point against greedy bias)."""
    stats = position_stats(torch.tensor([[0.0, math.log(3)]]))
    torch.testing.assert_close(stats["log_p2"], torch.tensor([math.log(5 / 8)]))
    torch.testing.assert_close(stats["entropy"], torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    for logits in (torch.tensor([0.0, math.log(3)]), torch.tensor([5.0, 0.0, -1.0, 2.0])):
        p = torch.softmax(logits, -1)
        aligned = p / position_stats(logits)["log_p2"].exp()
        assert (p * aligned).sum().item() == pytest.approx(1.0)


def test_policy_factors_are_constants_to_the_loss():
    """The loss's gradient with the reweighter equals the gradient of the same loss with the factors as numbers."""
    seen = seen_pairs()
    logps = seen["logps"].clone().requires_grad_()
    losses = -(logps * seen["mask"]).sum(-1).view(2, 2).sum(-1)  # a per-pair loss that depends on the log-probs
    weights = make_reweighter("policy").reweigh({}, {**seen, "logps": logps}, torch.ones(2))
    assert not weights.requires_grad
    (gradient,) = torch.autograd.grad((weights * losses).sum(), logps, retain_graph=True)
    constants = torch.tensor([math.exp(-1.3), 1.0])
    (expected,) = torch.autograd.grad((constants * losses).sum(), logps)
    torch.testing.assert_close(gradient, expected)


def test_importance_factors_by_hand(world_of_one):
    """pi / rho of each pair (its two responses' log-prob sums): pair 0 log pi = -1.5 - 2.0 = -3.5, log rho =
    -2.0 - 2.5 = -4.5 -> ratio e; pair 1 log pi = -0.2 - 0.6 = -0.8, log rho = -0.8 + 3 = 2.2 -> e^-3; pair 2
    log pi - log rho = 2.5 -> e^2.5 = 12.18, clipped at 5. Self-normalising divides the step's gradients by the mean
    factor (e + e^-3 + 5) / 3, over every micro-batch of the step (here two)."""
    reweighter = make_reweighter("importance:runs/behaviour")
    assert reweighter.self_normalised and reweighter.behaviour_path == "runs/behaviour"
    reweighter([pair_row()])
    seen = seen_pairs()
    # rho's log-probs of the dataset rows' two responses (what `prepare` computes), read by a batch's `index`
    reweighter.behaviour_logps = torch.tensor([[-6.0, -6.0], [-2.0, -2.5], [-0.8, 3.0]])
    factors = reweighter.reweigh({"index": torch.tensor([1, 2])}, seen, torch.ones(2))
    torch.testing.assert_close(factors, torch.tensor([math.e, math.exp(-3)]))
    second = {key: value[:2] for key, value in seen.items()}  # a second micro-batch: one pair, log pi = -3.5
    clipped = reweighter.reweigh({"index": torch.tensor([0])}, second, torch.ones(1))
    torch.testing.assert_close(clipped, torch.tensor([5.0]))  # e^(-3.5 + 12) = e^8.5 > 5
    metrics = reweighter.metrics(reweighter.stats)
    assert metrics["reweight/clipped_fraction"] == pytest.approx(1 / 3)
    mean = (math.e + math.exp(-3) + 5) / 3
    model = torch.nn.Linear(2, 1)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    assert self_normalise(reweighter, model) == pytest.approx(mean)
    torch.testing.assert_close(model.weight.grad, torch.full((1, 2), 1 / mean))
    assert self_normalise(make_reweighter("policy"), model) == 1.0  # WPO is not self-normalised


def test_importance_needs_the_policy_tokenizer(tmp_path, bpe_tokenizer):
    bpe_tokenizer.save_pretrained(tmp_path / "other")
    reweighter = make_reweighter(f"importance:{tmp_path / 'other'}")
    with pytest.raises(SystemExit, match="its tokenizer differs from the policy's") as e:
        reweighter.prepare([pair_row()], [0], load_tokenizer("toy"), torch.device("cpu"), torch.float32, 4)
    assert "\n" not in str(e.value)


@pytest.fixture
def policy_functions(tmp_path, monkeypatch):
    (tmp_path / "policy_factors.py").write_text(
        "import torch\n"
        "def length(batch, policy):\n"
        "    policy['logps'].zero_()  # must not reach the caller\n"
        "    return policy['mask'].sum(-1)\n"
        "def negative(batch, policy): return [-1.0] * len(policy['mask'])\n"
        "def nan(batch, policy): return [float('nan')] * len(policy['mask'])\n"
        "def too_short(batch, policy): return [1.0]\n"
    )
    monkeypatch.chdir(tmp_path)
    return "policy_factors"


def test_python_function_of_the_policy(policy_functions):
    """A function of two arguments runs in the loop: factors = response lengths 2, 1, 2, 2 (single responses)."""
    reweighter = make_reweighter(f"python:{policy_functions}:length")
    assert reweighter.sees_policy
    seen = seen_pairs()
    weights = reweighter.reweigh({"prompt": ["a"] * 4}, seen, torch.tensor([1.0, 1.0, 0.5, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.0, 1.0, 2.0]))
    assert seen["logps"][0, 0] == -0.5  # the function changed its copy only
    for function, problem in (("negative", "got -1.0"), ("nan", "got nan"), ("too_short", "got list of length 1")):
        with pytest.raises(SystemExit, match="must return one factor per example") as e:
            make_reweighter(f"python:{policy_functions}:{function}").reweigh({}, seen, torch.ones(4))
        assert problem in str(e.value) and "\n" not in str(e.value)


def test_importance_weights_in_the_scripts(sft_model, tmp_path):
    """dpo_pairwise.py --reweighter importance:SFT from that SFT model: at step 1 pi == rho, every factor is 1 (the
    precomputed rho log-probs are of the same responses); a global batch of 16 as 16 x 1 and as 8 x 2 accumulation
    gives the same weights, self-normalisation over the whole step included. Online, a one-line error."""
    common = ["--model_name_or_path", str(sft_model), "--reweighter", f"importance:{sft_model}", "--max_steps", "3"]
    common += ["--log_every", "1", "--eval_every", "1000", "--num_eval_examples", "16", "--learning_rate", "1e-4"]
    common += ["--eval.num_prompts", "16"]
    run_script("dpo_pairwise.py", *common, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "full"))
    run_script(
        "dpo_pairwise.py",
        *common,
        *("--per_device_batch_size", "8", "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "acc")),
    )
    full, accumulated = ([m for m in read_metrics(tmp_path / d) if "train/loss" in m] for d in ("full", "acc"))
    assert full[0]["reweight/mean_factor"] == pytest.approx(1, abs=1e-5)
    assert full[0]["reweight/ess"] == pytest.approx(16, abs=1e-4)
    assert full[-1]["reweight/mean_factor"] != pytest.approx(1, abs=1e-4)  # the policy moved: the factors do
    for a, b in zip(full, accumulated):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["reweight/ess"] == pytest.approx(b["reweight/ess"], rel=1e-5)
    for name, w in load_file(tmp_path / "full" / "model.safetensors").items():
        torch.testing.assert_close(load_file(tmp_path / "acc" / "model.safetensors")[name], w, atol=1e-5, rtol=0)
    online = run_script(
        "kto_pointwise.py", "--online", "--reweighter", "importance:x", "--output_dir", str(tmp_path / "o"), check=False
    )
    assert (
        online.returncode != 0 and "importance weights are for offline data" in online.stderr.strip().splitlines()[-1]
    )


@pytest.mark.parametrize("script", ["sft.py", "kto_pointwise.py"])
def test_policy_reweighting_in_the_scripts(sft_model, tmp_path, script):
    """WPO in the loop of the single-response scripts: factors logged, near 1 on the SFT model's own kind of data."""
    run_script(
        script,
        *("--model_name_or_path", str(sft_model), "--reweighter", "policy", "--max_steps", "2", "--log_every", "1"),
        *(
            "--eval_every",
            "1000",
            "--num_eval_examples",
            "16",
            "--eval.num_prompts",
            "16",
            "--output_dir",
            str(tmp_path),
        ),
    )
    logged = [m for m in read_metrics(tmp_path) if "train/loss" in m]
    assert len(logged) == 2 and all(0.3 < m["reweight/mean_factor"] < 3 and m["reweight/ess"] > 1 for m in logged)
