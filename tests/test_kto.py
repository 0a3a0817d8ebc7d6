"""kto_pointwise.py: the loss by hand, the mismatched pairs, z_ref over the global step (1 process == 2 processes ==
accumulation), single-class steps, resume, learning on the toy task offline and online."""

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

import kto_pointwise
from common.batch import pad
from conftest import assert_resume_is_exact, read_metrics, run_script

T = torch.tensor


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def loss(rewards, z_ref, desirable, beta, desirable_weight, undesirable_weight):
    """kto_loss's losses, for log pi - log ref = rewards (reference log-probs 0)."""
    args = kto_pointwise.Args(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    return kto_pointwise.kto_loss(rewards, torch.zeros_like(rewards), z_ref, desirable, args)[0]


def test_kto_loss_by_hand():
    """beta 0.5, z_ref 0.5, r = 2 for both: a desirable example loses 1 - sigmoid(0.5 * (2 - 0.5)) = 1 - sigmoid(0.75)
    = 0.3208213; an undesirable one with lambda_U = 2 loses 2 - 2 * sigmoid(0.5 * (0.5 - 2)) = 2 - 2 * sigmoid(-0.75)
    = 1.3583574."""
    losses = loss(T([2.0, 2.0]), 0.5, T([True, False]), 0.5, 1.0, 2.0)
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.75), 2 - 2 * sigmoid(-0.75)])
    assert losses.tolist() == pytest.approx([0.3208213, 1.3583574])
    # a higher r lowers a desirable example's loss and raises an undesirable one's
    higher = loss(T([3.0, 3.0]), 0.5, T([True, False]), 0.5, 1.0, 2.0)
    assert higher[0] < losses[0] and higher[1] > losses[1]


def test_policy_equal_to_reference_gives_half_lambda():
    """r = 0 and z_ref = 0: every example loses lambda * (1 - sigmoid(0)) = lambda / 2."""
    losses = loss(torch.zeros(4), 0.0, T([True, True, False, False]), 0.1, 1.0, 1.5)
    assert losses.tolist() == pytest.approx([0.5, 0.5, 0.75, 0.75])


def test_mismatched_pairs_follow_positions_across_the_step(world_of_one):
    """Positions 3, 4 in one micro-batch and 5 in another, three prompts: 3 gets 4's response, 4 gets 5's, 5 (the
    last) gets 3's, whatever the micro-batches; nobody gets their own."""

    def batch(positions, prompts, responses):
        ids, mask = pad(responses, 0)
        return {
            "position": T(positions),
            "prompt": prompts,
            "generation1_response_token_ids": ids,
            "generation1_response_attention_mask": mask,
            "prompt_token_ids": torch.zeros(len(positions), 1, dtype=torch.long),
        }

    batches = [batch([4, 3], ["b", "a"], [[4, 4, 4], [3]]), batch([5], ["c"], [[5, 5]])]
    paired = kto_pointwise.mismatched_responses(batches, pad_token_id=0)
    responses = [[row[m.bool()].tolist() for row, m in zip(ids, mask)] for ids, mask in paired]
    assert responses == [[[5, 5], [4, 4, 4]], [[3]]]


def test_a_partner_never_answers_the_same_prompt():
    """Examples 0-5 where 0 and 1, and 3 and 4, share a prompt (a prompt's two responses side by side, as length
    grouping puts the unpaired halves of a pair): each is paired with the next example of another prompt, cyclically;
    where every prompt is the same, with the next example."""
    examples = [(0, "a"), (1, "a"), (2, "b"), (3, "c"), (4, "c"), (5, "d")]
    assert kto_pointwise.mismatched_partners(examples) == {0: 2, 1: 2, 2: 3, 3: 5, 4: 5, 5: 0}
    assert kto_pointwise.mismatched_partners([(7, "x"), (8, "x")]) == {7: 8, 8: 7}


def test_label_threshold(world_of_one):
    scores = T([0.2, 1.0, 1.0, 0.5])
    assert kto_pointwise.label_threshold(scores, "median") == 0.75
    assert kto_pointwise.label_threshold(scores, "mean") == pytest.approx(0.675)
    assert kto_pointwise.label_threshold(scores, "0.9") == 0.9


FAST = [
    "--max_steps",
    "6",
    "--log_every",
    "1",
    "--eval_every",
    "1000",
    "--warmup_steps",
    "1",
    "--num_eval_examples",
    "32",
    "--eval.num_prompts",
    "16",
    "--learning_rate",
    "1e-3",
]


def test_z_ref_over_the_global_step_does_not_depend_on_the_split(tmp_path):
    """A global batch of 16 as 16 x 1, 4 x 4 accumulation (micro-batches of one class happen), and 2 processes x 8:
    kl is the mean over the whole step's mismatched pairs, so kl, the losses and the final weights agree to 1e-5."""
    run_script("kto_pointwise.py", *FAST, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "full"))
    run_script(
        "kto_pointwise.py",
        *FAST,
        "--per_device_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "4",
        "--output_dir",
        str(tmp_path / "accum"),
    )
    run_script(
        "kto_pointwise.py", *FAST, "--per_device_batch_size", "8", "--output_dir", str(tmp_path / "two"), nproc=2
    )
    runs = [[m for m in read_metrics(tmp_path / d) if "train/loss" in m] for d in ("full", "accum", "two")]
    assert len(runs[0]) == 6
    for key in ("train/loss", "kl"):
        full, accum, two = ([m[key] for m in run] for run in runs)
        assert max(abs(a - b) for a, b in zip(full, accum)) < 1e-5 and max(abs(a - b) for a, b in zip(full, two)) < 1e-5
    assert all(m["z_ref"] == max(m["kl"], 0.0) for m in runs[0])  # clamped at 0, the estimate logged as it is
    # step 1 runs before any update, policy == reference: kl is 0, so the precomputed reference log-probs are of the
    # same mismatched pairs as the policy's (the next example of the step); the loss is lambda * (1 - sigmoid(0))
    assert abs(runs[0][0]["kl"]) < 1e-5 and runs[0][0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("full", "accum", "two")]
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-5) and torch.allclose(w, weights[2][name], atol=1e-5), name


def test_single_class_and_batch_of_one(tmp_path):
    """Only desirable examples (a pointwise file whose labels are all true), one example per device and 2 processes:
    it trains (kl pairs each example with the other process's), and a global batch of 1 is a one-line error."""
    data = tmp_path / "good.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "completion": "".join(sorted(p[:-1])), "label": True}) + "\n"
            for p in ("dcba=", "zyx=", "qwer=", "mlkj=")
        )
    )
    args = ["--dataset", str(data), "--max_steps", "2", "--log_every", "1", "--per_device_batch_size", "1"]
    run_script("kto_pointwise.py", *args, "--output_dir", str(tmp_path / "two"), nproc=2)
    logged = [m for m in read_metrics(tmp_path / "two") if "train/loss" in m]
    assert len(logged) == 2 and all(m["train/desirable_fraction"] == 1.0 for m in logged)
    proc = run_script("kto_pointwise.py", *args, "--output_dir", str(tmp_path / "one"), check=False)
    assert proc.returncode != 0 and "at least 2 examples" in proc.stderr.strip().splitlines()[-1]


def test_bad_label_is_a_one_line_error(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "ab=", "completion": "ab", "label": "maybe"}) + "\n")
    proc = run_script("kto_pointwise.py", "--dataset", str(data), "--output_dir", str(tmp_path / "x"), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "row 0" in last and "maybe" in last


def test_offline_kto_raises_reward_over_sft(sft_model, tmp_path):
    """Offline KTO (its defaults) on the toy pointwise data, from the SFT model: eval/reward up >= 0.05 in 120 s."""
    start = time.time()
    args = ["--model_name_or_path", str(sft_model), "--eval_every", "1000"]  # evaluated first and last
    run_script("kto_pointwise.py", *args, "--output_dir", str(tmp_path))
    seconds, metrics = time.time() - start, read_metrics(tmp_path)
    rewards = [m["eval/reward"] for m in metrics if "eval/reward" in m]
    print(f"eval/reward {rewards} in {seconds:.0f} s")
    assert rewards[-1] >= rewards[0] + 0.05 and seconds < 120
    assert metrics[-1]["eval/rewards/margins"] > 0 and len({m["step"] for m in metrics}) == len(metrics)


def test_online_kto_learns_past_rho(sft_model, tmp_path):
    """Online KTO with the toy annotator, from the SFT model (~0.73): eval/reward >= 0.95 within 120 s."""
    start = time.time()
    args = ["--online", "--model_name_or_path", str(sft_model), "--eval_every", "1000"]  # evaluated first and last
    run_script("kto_pointwise.py", *args, "--output_dir", str(tmp_path))
    seconds = time.time() - start
    rewards = [(m["step"], round(m["eval/reward"], 3)) for m in read_metrics(tmp_path) if "eval/reward" in m]
    print(f"eval/reward {rewards} in {seconds:.0f} s")
    assert rewards[0][1] < 0.8 and rewards[-1][1] >= 0.95 and seconds < 120


def test_online_kto_under_torchrun_and_resume(sft_model, tmp_path):
    run_script(
        "kto_pointwise.py",
        "--online",
        "--model_name_or_path",
        str(sft_model),
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
        "--output_dir",
        str(tmp_path / "two"),
        nproc=2,
    )
    logged = [m for m in read_metrics(tmp_path / "two") if "train/loss" in m]
    assert len(logged) == 3 and all("online/threshold" in m and "kl" in m for m in logged)
    assert_resume_is_exact(
        tmp_path / "resume",
        "kto_pointwise.py",
        "--online",
        "--model_name_or_path",
        str(sft_model),
        "--max_steps",
        "12",
        "--per_device_batch_size",
        "8",
        "--log_every",
        "2",
        "--eval_every",
        "4",
        "--eval.num_prompts",
        "16",
        "--save_every",
        "3",
        checkpoint=3,
    )
