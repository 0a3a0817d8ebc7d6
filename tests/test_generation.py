"""Sampling from the policy (common/generation.py): the decode loop over a KV cache allocated once per rollout, whose
step a CUDA graph replays on CUDA, computes what a plain forward computes, so the samples follow the policy's
distribution (the sampler itself: tests/test_online.py) and greedy decoding gives transformers' own tokens."""

import json

import pytest
import torch

import common.generation
from common.batch import pad
from common.generation import Decoder, generate
from common.logps import prefill, shared_prompt_logps, token_logps
from common.model import load_causal_lm, load_tokenizer
from tests.conftest import run_script

PROMPTS = ("a", "dbca=", "fedcba=", "cb=")


def left_padded(tokenizer, prompts=PROMPTS):
    return pad([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id, left=True)


def decoded_logps(model, prompt_ids, prompt_mask, response_ids, response_mask, cuda_graph=False):
    """log pi(y_t | x, y_<t) of given responses (n per prompt), each step's logits from the Decoder fed y_<t."""
    n, length = response_ids.shape[0] // prompt_ids.shape[0], response_ids.shape[1]
    with torch.no_grad():
        logits, cache, position = prefill(model, prompt_ids, prompt_mask)
        decode = Decoder(model, cache, prompt_mask, position, n, length, cuda_graph)
        steps = [logits[:, -1].repeat_interleave(n, 0)]
        for t in range(length - 1):
            steps.append(decode(response_ids[:, t], response_mask[:, t].bool()).clone())
    return token_logps(torch.stack(steps, 1), response_ids) * response_mask


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_each_decode_step_gives_the_log_probs_of_a_full_forward(implementation):
    """Prompts of 1 to 7 tokens, 2 responses each of 1 to 6 tokens (right-padded: a response that ended at EOS), fed
    one token at a time into the static cache: the log-probs equal shared_prompt_logps' (the loss's forward) to 1e-5
    in fp32, so a sample drawn from a step's logits is drawn from the policy."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("toy")
    model = load_causal_lm("toy", tokenizer, torch.device("cpu"))
    model.set_attn_implementation(implementation)
    prompt_ids, prompt_mask = left_padded(tokenizer)
    lengths = [6, 1, 4, 6, 3, 2, 5, 6]
    response_ids = torch.randint(3, len(tokenizer), (8, 6))
    response_mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).long()
    expected = shared_prompt_logps(model, prompt_ids, prompt_mask, response_ids, response_mask)
    got = decoded_logps(model, prompt_ids, prompt_mask, response_ids, response_mask)
    assert model.config._attn_implementation == implementation
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_tokens_are_transformers_generate(sft_model):
    """Greedy decoding (temperature 0) of the toy SFT model, which ends its responses at EOS, from left-padded
    prompts: exactly the tokens of transformers' generate, and 2 samples of a prompt are both that response."""
    tokenizer = load_tokenizer(str(sft_model))
    model = load_causal_lm(str(sft_model), tokenizer, torch.device("cpu"))
    prompt_ids, prompt_mask = left_padded(tokenizer)
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours, mask = generate(
        model, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad_id, temperature=0.0
    )
    theirs = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=pad_id,
    )[:, prompt_ids.shape[1] :]
    assert (ours == eos).any(-1).all() and torch.equal(ours, theirs)
    twice, _ = generate(
        model, prompt_ids, prompt_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad_id, temperature=0.0,
        num_samples=2,
    )  # fmt: skip
    assert torch.equal(twice[0::2], ours) and torch.equal(twice[1::2], ours) and mask.sum() < mask.numel()


def test_checking_eos_every_few_tokens_gives_the_same_samples(sft_model, monkeypatch):
    """On CUDA the loop checks for EOS every EOS_CHECK_EVERY tokens (each check waits for the GPU): the samples drawn
    with the same generator are the same, shapes included, as checking after every token, in rollouts where every
    sample ended early (the columns after the last EOS are cut) and where one ran to max_new_tokens."""
    tokenizer = load_tokenizer(str(sft_model))
    model = load_causal_lm(str(sft_model), tokenizer, torch.device("cpu"))
    prompt_ids, prompt_mask = left_padded(tokenizer, ("dbca=", "dcb=", "cad=", "bdac=") * 4)  # toy task prompts
    options = dict(max_new_tokens=32, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lengths = set()
    for seed in range(6):
        samples = []
        for every in ({}, {"cpu": 4}, {"cpu": 5}):
            monkeypatch.setattr(common.generation, "EOS_CHECK_EVERY", every)
            generator = torch.Generator().manual_seed(seed)
            samples.append(generate(model, prompt_ids, prompt_mask, **options, num_samples=2, generator=generator))
        ids, mask = samples[0]
        for other_ids, other_mask in samples[1:]:
            assert torch.equal(other_ids, ids) and torch.equal(other_mask, mask)
        lengths.add(mask.shape[1])
    assert min(lengths) < 32 and max(lengths) == 32


def test_each_process_draws_its_own_samples(tmp_path):
    """Under torchrun --nproc_per_node 2, the same two prompts from the same sharded policy: each process's
    OnlineSampler draws from its own generator (seeded with seed and rank), so the processes' samples differ."""
    out = tmp_path / "samples.json"
    run_script("tests/two_samplers.py", str(out), nproc=2)
    first, second = json.loads(out.read_text())
    assert first["prompts"] == second["prompts"] and len(first["responses"]) == 2
    assert first["responses"] != second["responses"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_graph_replays_the_decode_step(dtype):
    """On CUDA: decoding with the step recorded once and replayed gives the log-probs of decoding without the graph
    (the same kernels: equal to 1e-5 in fp32; bf16 within its rounding), and those of the loss's forward."""
    from common.distributed import prepare_model

    torch.manual_seed(0)
    cuda = torch.device("cuda")
    tokenizer = load_tokenizer("toy")
    model = prepare_model(load_causal_lm("toy", tokenizer, cuda), cuda, dtype)
    prompt_ids, prompt_mask = (x.to(cuda) for x in left_padded(tokenizer))
    response_ids = torch.randint(3, len(tokenizer), (8, 6), device=cuda)
    response_mask = (torch.arange(6, device=cuda) < torch.tensor([6, 1, 4, 6, 3, 2, 5, 6], device=cuda)[:, None]).long()
    inputs = prompt_ids, prompt_mask, response_ids, response_mask
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        graphed, plain = (decoded_logps(model, *inputs, cuda_graph=graph) for graph in (True, False))
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(graphed, plain, atol=tolerance, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(graphed, shared_prompt_logps(model, *inputs), atol=tolerance, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_greedy_tokens_with_and_without_the_cuda_graph():
    """On CUDA, fp32: generate's default (the graph) and cuda_graph=False give the same greedy tokens."""
    cuda = torch.device("cuda")
    tokenizer = load_tokenizer("toy")
    model = load_causal_lm("toy", tokenizer, cuda)
    prompt_ids, prompt_mask = (x.to(cuda) for x in left_padded(tokenizer))
    options = dict(max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    graphed, plain = (
        generate(model, prompt_ids, prompt_mask, **options, temperature=0.0, num_samples=2, cuda_graph=graph)[0]
        for graph in (None, False)
    )
    assert common.generation.graph_failure is None and torch.equal(graphed, plain)
