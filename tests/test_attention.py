"""Attention in our forwards. Left-padded prompts put, under a causal mask, a query with no key to see at every
padding position: a fully masked row. On an H100/H200 torch prefers cuDNN for masked attention, whose backward
returns NaN query gradients for such rows at key lengths of 64 (mod 128) (pytorch/pytorch#196678), which offline DPO
and KTO trained into. So: no attention call of ours has a fully masked row (common.logps.attention_mask), whatever
the backend; and the prompt pass and its backward are finite in bf16 on every SDPA backend this torch has, at those
key lengths (on a CPU the backends all cope with fully masked rows, so there only the first test fails without the
fix; on a GPU both do)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.batch import pad
from common.generation import generate
from common.logps import response_logps, shared_prompt_logps, token_values
from common.model import checkpoint_activations, load_causal_lm, load_tokenizer, load_value_model

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def attention_calls(monkeypatch):
    """The attention mask of every call of torch's scaled_dot_product_attention (transformers' sdpa path)."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        masks.append(attn_mask)
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return masks


def fully_masked_rows(masks) -> int:
    """Query rows that see no key, over all recorded masks (bool: True sees; additive: above the dtype's minimum)."""
    rows = 0
    for mask in masks:
        if mask is not None:
            visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
            rows += int((~visible.any(-1)).sum())
    return rows


def left_padded_batch(tokenizer, prompt_lengths, response_lengths, n=2, seed=0):
    """Random prompts (left-padded) and n responses each (right-padded), token ids of the toy vocabulary."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(length):
        return torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()

    prompt_ids, prompt_mask = pad([tokens(length) for length in prompt_lengths], tokenizer.pad_token_id, left=True)
    response_ids, response_mask = pad(
        [tokens(length) for length in response_lengths for _ in range(n)], tokenizer.pad_token_id
    )
    return prompt_ids, prompt_mask, response_ids, response_mask


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_query_row_is_fully_masked(attention_calls, checkpointing):
    """Every forward that runs a left-padded prompt: the prompt pass and the responses after it (and, with gradient
    checkpointing, prompt and responses in one sequence), with backward; sampling (prefill and decoding); the critic's
    values (prompt + response in one sequence); a right-padded full sequence. The recorder sees the calls and, for the
    transformers-made mask of a left-padded prompt, finds the rows this fix removes."""
    tokenizer = load_tokenizer("toy")
    model = load_causal_lm("toy", tokenizer, CPU)
    if checkpointing:
        checkpoint_activations(model)
    prompt_ids, prompt_mask, response_ids, response_mask = left_padded_batch(tokenizer, [2, 5, 7], [1, 4, 6])

    shared_prompt_logps(model, prompt_ids, prompt_mask, response_ids, response_mask).sum().backward()
    options = dict(max_new_tokens=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    generate(model, prompt_ids, prompt_mask, **options, num_samples=2, generator=torch.Generator().manual_seed(0))
    critic = load_value_model("toy", tokenizer, CPU)
    token_values(critic, prompt_ids, prompt_mask, response_ids, response_mask).sum().backward()
    ids, mask = pad([[5, 6, 7], [5, 6, 7, 8, 9]], tokenizer.pad_token_id)
    response_logps(model, ids, mask, mask.bool() & (torch.arange(5) >= 1))[0].sum().backward()
    assert len(attention_calls) >= 2 * 4 * 4 and fully_masked_rows(attention_calls) == 0

    attention_calls.clear()  # the same prompts with the plain padding mask: what transformers builds from it
    model(input_ids=prompt_ids, attention_mask=prompt_mask)
    assert fully_masked_rows(attention_calls) == 4 * (5 + 2)  # 4 layers, the two shorter prompts' padding rows


def test_eager_attention_takes_the_same_mask():
    """The additive form of the mask (eager attention) gives the log-probs of torch's sdpa, to 1e-5 in fp32."""
    tokenizer = load_tokenizer("toy")
    sdpa_model, eager_model = (load_causal_lm("toy", tokenizer, CPU) for _ in range(2))
    eager_model.set_attn_implementation("eager")
    batch = left_padded_batch(tokenizer, [2, 5, 7], [1, 4, 6])
    expected, got = (shared_prompt_logps(model, *batch) for model in (sdpa_model, eager_model))
    assert eager_model.config._attn_implementation == "eager"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def usable(backend: SDPBackend) -> bool:
    """Whether this torch can run a masked bf16 attention with this backend on DEVICE."""
    q = torch.zeros(1, 1, 64, 32, device=DEVICE, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, torch.ones(64, 64, device=DEVICE).bool().tril())
    except RuntimeError:
        return False
    return True


BACKENDS = [backend for name, backend in SDPBackend.__members__.items() if name != "ERROR"]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda backend: backend.name)
@pytest.mark.parametrize("num_prompt", [64, 192])
def test_prompt_pass_is_finite_in_bf16(backend, num_prompt):
    """bf16, each SDPA backend: prompts padded to key lengths of 64 (mod 128) (up to num_prompt - 1 padding positions
    each), responses after them; the log-probs and every gradient of shared_prompt_logps are finite."""
    if not usable(backend):
        pytest.skip(f"{backend.name} cannot run here ({DEVICE.type})")
    tokenizer = load_tokenizer("toy")
    model = load_causal_lm("toy", tokenizer, DEVICE).to(DEVICE, torch.bfloat16)
    batch = left_padded_batch(tokenizer, [1, num_prompt // 2, num_prompt], [3, 60, 64])
    with sdpa_kernel([backend]):
        logps = shared_prompt_logps(model, *(t.to(DEVICE) for t in batch))
        logps.sum().backward()
    assert torch.isfinite(logps).all() and logps.sum() != 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
