"""reward_model.py and offline dpo_pairwise.py: losses by hand, 1 vs 2 processes, learning on the toy task."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import dpo_pairwise
import reward_model
from common.batch import pad
from common.logps import response_logps, shared_prompt_logps
from common.model import load_causal_lm, load_reward_model, load_tokenizer, reward_scores
from conftest import read_metrics, run_script

T = torch.tensor


def dpo(logps1, logps2, ref1, ref2, reward1=1.0, reward2=0.0, beta=0.5, loss_type="sigmoid", label_smoothing=0.0):
    """One pair through dpo_loss (it orients by the rewards). (loss, chosen and rejected reward)"""
    batch = {"generation1_reward": T([reward1]), "generation2_reward": T([reward2])}
    args = dpo_pairwise.Args(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    losses, diagnostics = dpo_pairwise.dpo_loss(T([[logps1, logps2]]), T([[ref1, ref2]]), batch, args)
    return losses.item(), diagnostics["rewards/chosen"].item(), diagnostics["rewards/rejected"].item()


def test_dpo_equals_log2_when_policy_is_reference():
    loss, chosen, rejected = dpo(-3.7, -5.2, -3.7, -5.2)
    assert loss == pytest.approx(math.log(2)) and chosen == 0 and rejected == 0


def test_dpo_by_hand():
    """logps (-1, -3), reference (-2, -2), beta 0.5: pi_logratios = 2, ref_logratios = 0, logits = 2,
    loss = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617; implicit rewards 0.5 * (-1 + 2) = 0.5 and
    0.5 * (-3 + 2) = -0.5."""
    loss, chosen, rejected = dpo(-1.0, -3.0, -2.0, -2.0)
    assert loss == pytest.approx(0.3132617) and chosen == pytest.approx(0.5) and rejected == pytest.approx(-0.5)
    # the same pair with generation2 the preferred one (as online batches may have it): identical
    assert dpo(-3.0, -1.0, -2.0, -2.0, reward1=0.0, reward2=1.0) == pytest.approx((0.3132617, 0.5, -0.5))
    # the preference flipped: logits = -2, loss = log(1 + e^1) = 1.3132617
    assert dpo(-1.0, -3.0, -2.0, -2.0, reward1=0.0, reward2=1.0)[0] == pytest.approx(1.3132617)


def test_conservative_dpo():
    """label smoothing 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.4132617; a per-pair tensor of smoothing
    (soft labels) gives each pair its own: 0 -> 0.3132617, 0.5 -> (log(1 + e^-1) + log(1 + e^1)) / 2 = 0.8132617."""
    assert dpo(-1.0, -3.0, -2.0, -2.0, label_smoothing=0.1)[0] == pytest.approx(0.4132617)
    batch = {"generation1_reward": T([1.0, 1.0]), "generation2_reward": T([0.0, 0.0])}
    args = dpo_pairwise.Args(beta=0.5, label_smoothing=T([0.0, 0.5]))
    losses, _ = dpo_pairwise.dpo_loss(T([[2.0, 0.0], [2.0, 0.0]]), torch.zeros(2, 2), batch, args)
    assert losses.tolist() == pytest.approx([0.3132617, 0.8132617])


def test_ipo_by_hand():
    """IPO on per-token means: policy -4/2 = -2 and -6/3 = -2, reference -2/2 = -1 and -9/3 = -3;
    logits = (-2 + 2) - (-1 + 3) = -2; beta 0.25: loss = (-2 - 1/(2 * 0.25))^2 = (-4)^2 = 16."""
    batch = {
        "generation1_reward": T([1.0]),
        "generation2_reward": T([0.0]),
        "generation1_response_attention_mask": T([[1, 1, 0]]),
        "generation2_response_attention_mask": T([[1, 1, 1]]),
    }
    args = dpo_pairwise.Args(beta=0.25, loss_type="ipo")
    losses, _ = dpo_pairwise.dpo_loss(T([[-4.0, -6.0]]), T([[-2.0, -9.0]]), batch, args)
    assert losses.item() == pytest.approx(16.0)
    # at its optimum, logits = 1/(2 beta) = 0.5, the loss is 0
    batch |= {"generation1_response_attention_mask": T([[1]]), "generation2_response_attention_mask": T([[1]])}
    args = dpo_pairwise.Args(beta=1.0, loss_type="ipo")
    assert dpo_pairwise.dpo_loss(T([[0.25, -0.25]]), torch.zeros(1, 2), batch, args)[0].item() == pytest.approx(0.0)


def test_online_label_rule():
    """label_pairs: a clear or graded verdict orients the pair; a tie or a failure makes it untrainable (departure
    3), at weight 0."""
    prompt, pair = {"prompt": "p", "prompt_ids": [5]}, [{"response": "a", "response_ids": [6]}] * 2
    groups = dpo_pairwise.label_pairs([prompt] * 4, [pair] * 4, [1.0, 0.2, 0.5, None])
    rows = [group[0] for group in groups]
    assert [(r["generation1_reward"], r["generation2_reward"]) for r in rows[:2]] == [(1.0, 0.0), (0.0, 1.0)]
    assert [r["trainable"] for r in rows] == [True, True, False, False]
    assert [r["generation1_weight"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["preference"] for r in rows] == [1.0, 0.2, 0.5, None]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logps_equal_one_forward_per_sequence(checkpointing):
    """Running each prompt once and its two responses from its KV cache gives the log-probs, and the gradients,
    of running every prompt + response sequence on its own (prompts of 3, 7, 5 tokens, responses of 1 to 9)."""
    tok = load_tokenizer("toy")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, len(tok), (n,), generator=generator).tolist() for n in (3, 7, 5)]
    responses = [
        torch.randint(4, len(tok), (n,), generator=generator).tolist() for n in (4, 6, 1, 9, 3, 2)
    ]  # prompt i: rows 2i, 2i+1
    results = []
    for shared in (True, False):
        model = load_causal_lm("toy", tok, torch.device("cpu"), gradient_checkpointing=checkpointing)
        if shared:
            logps = shared_prompt_logps(
                model, *pad(prompts, tok.pad_token_id, left=True), *pad(responses, tok.pad_token_id)
            ).sum(-1)
        else:
            ids, mask = pad([prompts[i // 2] + r for i, r in enumerate(responses)], tok.pad_token_id)
            response_mask = torch.zeros_like(ids, dtype=torch.bool)
            for i, r in enumerate(responses):
                response_mask[i, len(prompts[i // 2]) : len(prompts[i // 2]) + len(r)] = True
            logps = response_logps(model, ids, mask, response_mask)[0].sum(-1)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (shared_logps, shared_grads), (logps, grads) = results
    assert torch.allclose(shared_logps, logps, atol=1e-5) and torch.allclose(shared_grads, grads, atol=1e-5)
    assert logps.abs().min() > 0  # every response has log-probs (none was masked away)


def test_reward_model_orients_pairs():
    """rewards (2, 0) and (0, 2) with the second pair's generation2 preferred: chosen 2, rejected 0 in both, so the
    Bradley-Terry loss -log sigmoid(2) = log(1 + e^-2) = 0.1269280 in both; equal rewards give log 2."""
    batch = {"generation1_reward": T([1.0, 0.0]), "generation2_reward": T([0.0, 1.0])}
    chosen_rewards, rejected_rewards = reward_model.chosen_rejected(T([[2.0, 0.0], [0.0, 2.0]]), batch)
    assert chosen_rewards.tolist() == [2.0, 2.0] and rejected_rewards.tolist() == [0.0, 0.0]
    assert (-F.logsigmoid(chosen_rewards - rejected_rewards)).tolist() == pytest.approx([0.1269280] * 2)
    assert -F.logsigmoid(T(0.0)).item() == pytest.approx(math.log(2))


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
]


@pytest.mark.parametrize(
    "script, extra",
    [("dpo_pairwise.py", ["--eval.num_prompts", "16"]), ("reward_model.py", ["--learning_rate", "1e-4"])],
)
def test_accumulation_and_two_processes_match_one_full_batch(tmp_path, script, extra):
    """A global batch of 16 pairs as 16 x 1 accumulation, 8 x 2 accumulation, and 2 processes x 8: the losses are
    normalised by the global pair count, so all three give the same losses and the same final weights. (The reward
    model at 1e-4, not its toy default 1e-3: AdamW moves an element whose gradient is ~0 by up to the learning rate
    whatever the gradient's size, so float-summation differences there move it by a sizeable share of a step; at
    1e-3 a dozen of the 0.5M elements differed by 1.3e-5 after 6 steps, the losses by 1e-7.)"""
    run_script(script, *FAST, *extra, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "full"))
    run_script(
        script,
        *FAST,
        *extra,
        "--per_device_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--output_dir",
        str(tmp_path / "accum"),
    )
    run_script(script, *FAST, *extra, "--per_device_batch_size", "8", "--output_dir", str(tmp_path / "two"), nproc=2)
    full, accum, two = (
        [m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m] for d in ("full", "accum", "two")
    )
    assert (
        len(full) == 6
        and max(abs(a - b) for a, b in zip(full, accum)) < 1e-5
        and max(abs(a - b) for a, b in zip(full, two)) < 1e-5
    )
    weights = [load_file(tmp_path / d / "model.safetensors") for d in ("full", "accum", "two")]
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-5) and torch.allclose(w, weights[2][name], atol=1e-5), name


def test_dpo_raises_reward_over_sft(sft_model, tmp_path):
    """Offline DPO (its defaults) on the toy pairs, from the SFT model: eval/reward up by >= 0.05."""
    args = ["--model_name_or_path", str(sft_model), "--eval_every", "1000"]  # evaluated first and last
    run_script("dpo_pairwise.py", *args, "--output_dir", str(tmp_path))
    metrics = read_metrics(tmp_path)
    rewards = [m["eval/reward"] for m in metrics if "eval/reward" in m]
    print(f"eval/reward {rewards}")
    assert metrics[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert rewards[-1] >= rewards[0] + 0.05
    assert metrics[-1]["eval/rewards/accuracies"] > 0.9
    assert len({m["step"] for m in metrics}) == len(metrics)  # one object per logged step
    assert {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "train/tokens_per_s",
    } <= set().union(*metrics)


def test_reward_model_learns_and_is_centred(sft_model, tmp_path):
    run_script(
        "reward_model.py", "--model_name_or_path", str(sft_model), "--max_steps", "60", "--output_dir", str(tmp_path)
    )
    metrics = read_metrics(tmp_path)
    assert [m["eval/rewards/accuracies"] for m in metrics if "eval/rewards/accuracies" in m][-1] >= 0.95
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.architectures == ["LlamaForSequenceClassification"]
    mean = json.load(open(tmp_path / "config.json"))["reward_mean"]
    tok = load_tokenizer(str(tmp_path))
    rm = load_reward_model(str(tmp_path), tok, torch.device("cpu"))
    scores = reward_scores(rm, tok, ["dcba=", "dcba=", "xqmf="], ["abcd", "bacd", "fmqx"])
    assert scores[0] > scores[1]  # sorted > one swap (held-out accuracy says the RM ranks such pairs right)
    raw = rm(
        input_ids=T(
            [tok("dcba=")["input_ids"] + tok("abcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        )
    ).logits[0, 0]
    assert scores[0].item() == pytest.approx(raw.item() - mean, abs=1e-5)  # centred by the recorded mean


def test_scoring_with_a_causal_lm_is_a_clear_error(sft_model):
    with pytest.raises(SystemExit, match="is not a sequence-classification model"):
        load_reward_model(str(sft_model), load_tokenizer(str(sft_model)), torch.device("cpu"))
