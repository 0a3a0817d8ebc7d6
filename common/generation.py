"""Sampling from the policy being trained: batched, KV-cached, returns token ids (never re-tokenized text).

Works on an FSDP-sharded policy: each rank samples for its own prompts, and every rank runs the same
number of forward passes, stopping only when all ranks are done. The parameters are gathered once for the
whole loop (common.distributed.unsharded), not once per token.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.distributed import unsharded
from common.logps import CACHE, prefill


@dataclass
class GenerationArgs:
    """How a script samples from the policy (its --generation.* flags): online, the training samples; everywhere, the
    held-out samples' length (common/evaluation.py; their temperature is --eval.temperature)."""

    max_new_tokens: int = 16
    """longest sampled response in tokens (online samples and held-out samples)"""
    temperature: float = 1.0
    """sampling temperature of the online samples (> 0: at 0 every sample of a prompt is the same)"""
    top_p: float = 1.0
    """nucleus sampling of the online samples: keep the smallest set of tokens with this much probability"""


@torch.no_grad()
def generate(
    model,
    prompt_token_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample num_samples responses for each left-padded prompt (B, Tp).

    Returns (response_token_ids, response_attention_mask): (B * num_samples, Tr) right-padded with pad_token_id,
    prompt i's samples at rows i*n .. i*n + n - 1, each response ending at its EOS (included) or after
    max_new_tokens. The prompts run once; their KV cache is then copied for each sample. temperature 0 is greedy.
    `generator` draws the samples (None: torch's global RNG).
    """
    was_training = model.training
    model.eval()
    with unsharded(model):  # one all-gather for the whole loop, not one per token
        logits, cache, next_position = prefill(model, prompt_token_ids, prompt_attention_mask)
        cache.batch_repeat_interleave(num_samples)
        logits = logits[:, -1].repeat_interleave(num_samples, 0)
        next_position = next_position.repeat_interleave(num_samples, 0)
        # the attention mask of prompt + response, filled in as tokens are sampled
        num_prompt = prompt_attention_mask.shape[1]
        attention_mask = torch.cat(
            [
                prompt_attention_mask.repeat_interleave(num_samples, 0),
                prompt_attention_mask.new_zeros(logits.shape[0], max_new_tokens),
            ],
            1,
        )
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens, masks = [], []
        for t in range(max_new_tokens):
            next_token = sample(logits.float(), temperature, top_p, generator)
            masks.append(~done)
            tokens.append(torch.where(done, pad_token_id, next_token))
            done = done | (next_token == eos_token_id)
            if t == max_new_tokens - 1 or all_done(done):  # nothing more to sample: skip the forward
                break
            attention_mask[:, num_prompt + t] = masks[-1]
            logits = model(
                input_ids=tokens[-1][:, None],
                attention_mask=attention_mask[:, : num_prompt + t + 1],
                position_ids=next_position,
                use_cache=True,
                **{CACHE: cache},
            ).logits[:, -1]
            next_position = next_position + 1
    model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(masks, 1).long()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row from (B, V) logits: temperature, then nucleus (top-p) filtering."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # inverse-CDF sampling: the same distribution as torch.multinomial, far cheaper on CPU
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def all_done(done: torch.Tensor) -> bool:
    """True when every sequence on every rank has finished (a collective when there are several ranks)."""
    remaining = (~done).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(remaining)
    return remaining.item() == 0
