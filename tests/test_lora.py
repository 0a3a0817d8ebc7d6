"""LoRA (--lora.r > 0, common.model.add_lora): the reference is the policy with its adapters off, equal to the base
model bit for bit (so DPO's first loss is log 2 and KTO's first kl 0 exactly); only the adapters (and a reward
model's head) train; 1 process == 2 == accumulation; a killed run resumes to the same adapters; the output is the
adapters in peft's format and the merged model, which give the same log-probs; an adapter folder is a model to start
from; bad LoRA flags are one line each."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from common.batch import pad
from common.distributed import prepare_model
from common.logps import shared_prompt_logps
from common.model import LoraArgs, adapters_off, add_lora, load_causal_lm, load_reward_model, load_tokenizer, quiet_peft
from conftest import assert_resume_is_exact, read_metrics, run_script

CPU = torch.device("cpu")
QUICK = ["--log_every", "1", "--eval_every", "1000", "--warmup_steps", "1", "--lora.r", "8"]


def toy_batch(tokenizer):
    """Two left-padded prompts with two right-padded responses each: shared_prompt_logps' inputs."""
    prompts = [tokenizer(p)["input_ids"] for p in ("dcba=", "zyxwv=")]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in ("abcd", "abdc", "vwxyz", "vw")]
    return (*pad(prompts, tokenizer.pad_token_id, left=True), *pad(responses, tokenizer.pad_token_id))


def trained_adapters(model):
    """The model's adapters moved off their zero start (as training would), so that they change its outputs."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_adapters_off_is_the_base_model_bit_for_bit(world_of_one):
    """With its adapters disabled, a LoRA model gives a freshly loaded base model's log-probs exactly; with them on,
    other ones. Only the adapters require gradients, and only they get one."""
    tokenizer = load_tokenizer("toy")
    base = load_causal_lm("toy", tokenizer, CPU)
    model = prepare_model(add_lora(load_causal_lm("toy", tokenizer, CPU), LoraArgs(r=4), "toy"), CPU, torch.float32)
    trained_adapters(model)
    batch = toy_batch(tokenizer)
    with torch.no_grad(), adapters_off(model):
        off = shared_prompt_logps(model, *batch)
    assert torch.equal(off, shared_prompt_logps(base, *batch).detach())
    on = shared_prompt_logps(model, *batch)
    assert not torch.equal(on.detach(), off) and model.training  # adapters_off put back train mode
    on.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == ("lora_" in name) == (parameter.grad is not None), name


def test_first_steps_see_the_reference_exactly(tmp_path):
    """DPO and KTO with LoRA and the reference kept as a model: the policy with its adapters off, and the adapters start
    at zero, so the first step's DPO loss is log 2 and KTO's kl 0, to the last bit."""
    common = [*QUICK, "--no-precompute_ref_logps", "--max_steps", "1", "--per_device_batch_size", "8"]
    common += ["--eval.num_prompts", "8", "--num_eval_examples", "0"]
    run_script("dpo_pairwise.py", *common, "--output_dir", str(tmp_path / "dpo"))
    run_script("kto_pointwise.py", *common, "--output_dir", str(tmp_path / "kto"))
    dpo, kto = (read_metrics(tmp_path / d)[1] for d in ("dpo", "kto"))
    assert dpo["train/loss"] == -F.logsigmoid(torch.tensor(0.0)).item() and dpo["train/loss"] == pytest.approx(
        math.log(2)
    )
    assert kto["kl"] == 0.0 and kto["z_ref"] == 0.0
    assert read_metrics(tmp_path / "dpo")[0]["eval/kl"] == 0.0  # the held-out samples' KL to the reference, at step 0


def test_checkpoints_hold_the_adapters_only(tmp_path):
    """A checkpoint's model and optimizer state are the adapters' (and a reward model's head's): the frozen base is not
    saved again at every checkpoint, and AdamW has state for nothing else."""
    run_script("reward_model.py", *QUICK, "--max_steps", "2", "--save_every", "2", "--output_dir", str(tmp_path))
    dcp_to_torch_save(tmp_path / "checkpoint-2", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    model_keys, optimizer_keys = set(state["model"]), set(state["optimizer"]["state"])
    assert model_keys == optimizer_keys and model_keys and all(("lora_" in k or "score" in k) for k in model_keys)
    assert any("score" in k for k in model_keys)  # the head trains in full (modules_to_save)


def test_lora_one_process_two_and_accumulation_agree(tmp_path):
    """DPO with LoRA on a global batch of 16 pairs as 16 x 1, 8 x 2 accumulation and 2 processes x 8 (FSDP2 over the
    LoRA model): the same losses and the same adapters to 1e-5."""
    common = [*QUICK, "--max_steps", "4", "--eval.num_prompts", "16", "--num_eval_examples", "32"]
    run_script("dpo_pairwise.py", *common, "--per_device_batch_size", "16", "--output_dir", str(tmp_path / "full"))
    accumulation = ["--per_device_batch_size", "8", "--gradient_accumulation_steps", "2"]
    run_script("dpo_pairwise.py", *common, *accumulation, "--output_dir", str(tmp_path / "accum"))
    run_script(
        "dpo_pairwise.py", *common, "--per_device_batch_size", "8", "--output_dir", str(tmp_path / "two"), nproc=2
    )
    losses = [
        [m["train/loss"] for m in read_metrics(tmp_path / d) if "train/loss" in m] for d in ("full", "accum", "two")
    ]
    assert len(losses[0]) == 4 and all(max(abs(a - b) for a, b in zip(losses[0], other)) < 1e-5 for other in losses[1:])
    adapters = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("full", "accum", "two")]
    assert adapters[0] and all(adapters[0].keys() == other.keys() for other in adapters[1:])
    for name, weight in adapters[0].items():
        for other in adapters[1:]:
            torch.testing.assert_close(other[name], weight, atol=1e-5, rtol=0, msg=name)


def test_lora_resume_is_exact(tmp_path):
    """SFT with LoRA killed after a checkpoint and resumed: the same merged model and adapters, bit for bit."""
    args = [
        *QUICK,
        "--max_steps",
        "6",
        "--save_every",
        "3",
        "--eval.num_prompts",
        "16",
        "--per_device_batch_size",
        "16",
    ]
    assert_resume_is_exact(tmp_path, "sft.py", *args, checkpoint=3)
    straight, resumed = (
        load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("straight", "killed")
    )
    assert straight.keys() == resumed.keys() and all(torch.equal(w, resumed[k]) for k, w in straight.items())


def test_the_output_and_an_adapter_folder_to_start_from(tmp_path):
    """The adapters (peft's format, on the base) and the merged model (transformers' from_pretrained) give the same
    log-probs to 1e-5; the merged config keeps its tied embeddings. The adapter folder as --model_name_or_path is its
    base with the adapters merged in: training goes on from it (its first DPO loss is log 2: that model is its
    reference), and a folder whose base cannot be found is one line."""
    run_script("sft.py", *QUICK, "--max_steps", "3", "--eval.num_prompts", "8", "--output_dir", str(tmp_path / "sft"))
    tokenizer, batch = load_tokenizer("toy"), toy_batch(load_tokenizer("toy"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    with quiet_peft():
        with_adapters = PeftModel.from_pretrained(load_causal_lm("toy", tokenizer, CPU), tmp_path / "sft" / "adapter")
    with torch.no_grad():
        expected = shared_prompt_logps(with_adapters, *batch)
        torch.testing.assert_close(shared_prompt_logps(merged, *batch), expected, atol=1e-5, rtol=0)
        assert not torch.equal(expected, shared_prompt_logps(load_causal_lm("toy", tokenizer, CPU), *batch))
        loaded = load_causal_lm(str(tmp_path / "sft" / "adapter"), tokenizer, CPU)
        torch.testing.assert_close(shared_prompt_logps(loaded, *batch), expected, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["tie_word_embeddings"]

    adapter = str(tmp_path / "sft" / "adapter")
    common = [*QUICK, "--no-precompute_ref_logps", "--max_steps", "1", "--per_device_batch_size", "8"]
    common += ["--eval.num_prompts", "8", "--num_eval_examples", "0"]
    run_script("dpo_pairwise.py", *common, "--model_name_or_path", adapter, "--output_dir", str(tmp_path / "dpo"))
    assert read_metrics(tmp_path / "dpo")[1]["train/loss"] == -F.logsigmoid(torch.tensor(0.0)).item()
    config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/no/base"}))
    proc = run_script(
        "sft.py", "--model_name_or_path", str(tmp_path / "lost"), "--output_dir", str(tmp_path / "x"), check=False
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: LoRA adapter folder") and "its base model '/no/base' cannot be loaded" in last


def test_a_reward_model_trains_its_head_with_adapters(tmp_path):
    """reward_model.py --lora.r 8: the merged reward model and the adapter folder score alike but for the centring
    (the merged one records config.reward_mean)."""
    run_script("reward_model.py", *QUICK, "--max_steps", "3", "--output_dir", str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path))
    merged = load_reward_model(str(tmp_path), tokenizer, CPU)
    adapters = load_reward_model(str(tmp_path / "adapter"), tokenizer, CPU)
    ids = torch.tensor([tokenizer("dcba=abcd")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapters(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert hasattr(merged.config, "reward_mean")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora.r", "-1"], "--lora.r -1: must be 0 (no adapters: every weight trains) or more"),
        (["--lora.r", "8", "--lora.alpha", "0"], "--lora.alpha 0.0: must be above 0"),
        (["--lora.r", "8", "--lora.dropout", "1.0"], "--lora.dropout 1.0: must be in [0, 1)"),
        (
            ["--lora.r", "8", "--lora.target_modules", "q_proj,attn_out"],
            "the model's linear layers: ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj'",
        ),
    ],
)
def test_bad_lora_flags_are_one_line(tmp_path, flags, message):
    proc = run_script("sft.py", *flags, "--max_steps", "1", "--output_dir", str(tmp_path), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: ") and message in last, proc.stderr[-1000:]


def test_lora_with_gradient_checkpointing(tmp_path):
    """Adapters and recomputed activations together: the same losses as without recomputation."""
    common = [*QUICK, "--max_steps", "2", "--eval.num_prompts", "8", "--per_device_batch_size", "8"]
    run_script("dpo_pairwise.py", *common, "--output_dir", str(tmp_path / "plain"))
    run_script("dpo_pairwise.py", *common, "--gradient_checkpointing", "--output_dir", str(tmp_path / "recomputed"))
    plain, recomputed = ([m["train/loss"] for m in read_metrics(tmp_path / d)[1:]] for d in ("plain", "recomputed"))
    assert len(plain) == 2 and max(abs(a - b) for a, b in zip(plain, recomputed)) < 1e-5
