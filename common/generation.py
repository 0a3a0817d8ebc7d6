"""Sampling from the policy being trained: batched, KV-cached, returns token ids (never re-tokenized text).

A rollout prefills each prompt once and copies its KV cache for its samples, then decodes one token per step into a
cache allocated once for the whole rollout (transformers' StaticCache): every decode step has the same shapes, so on
CUDA the step is recorded as a CUDA graph after its first run and replayed for the other tokens, one launch per
token instead of one per kernel (the host, not the GPU, bounds a decode step of an unrecorded forward). The graph is
recorded afresh in each rollout: the weights change between rollouts (in place, but a LoRA merge or a new
autocast copy would not be), and recording costs about one forward. Sampling runs outside the graph, from the
caller's generator, so a rollout draws the same random numbers recorded or not; on CUDA EOS is checked every
`EOS_CHECK_EVERY` tokens, not every token, since each check waits for the GPU.

Works on an FSDP-sharded policy: each rank samples for its own prompts, and every rank runs the same number of
forward passes, stopping only when all ranks are done. The parameters are gathered once for the whole loop
(common.distributed.unsharded), not once per token; a sharded policy's forward runs FSDP's hooks, so it decodes
without a graph.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from transformers import StaticCache

from common.distributed import print0, unsharded
from common.logps import CACHE, for_attention, prefill

EOS_CHECK_EVERY = {"cuda": 8}  # tokens between two checks for EOS on every sequence; 1 on other devices
graph_failure = None  # why recording the decode step as a CUDA graph failed in this process, if it did


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
    cuda_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample num_samples responses for each left-padded prompt (B, Tp).

    Returns (response_token_ids, response_attention_mask): (B * num_samples, Tr) right-padded with pad_token_id,
    prompt i's samples at rows i*n .. i*n + n - 1, each response ending at its EOS (included) or after
    max_new_tokens. The prompts run once; their KV cache is then copied for each sample. temperature 0 is greedy.
    `generator` draws the samples (None: torch's global RNG). cuda_graph: replay the decode step as a CUDA graph
    (None: on CUDA, where the policy is not sharded; see Decoder).
    """
    was_training = model.training
    model.eval()
    device = prompt_token_ids.device
    check_every = EOS_CHECK_EVERY.get(device.type, 1)
    dtype = getattr(model, "autocast_dtype", None)  # a plain module's forward autocasts (common.distributed)
    # one all-gather for the whole loop, not one per token; one autocast around it, whose cache keeps each weight's
    # low-precision copy through the rollout instead of casting every weight at every token
    with unsharded(model), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits, cache, next_position = prefill(model, prompt_token_ids, prompt_attention_mask)
        logits = logits[:, -1].repeat_interleave(num_samples, 0)
        decode = Decoder(model, cache, prompt_attention_mask, next_position, num_samples, max_new_tokens, cuda_graph)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
        tokens, masks = [], []
        for t in range(max_new_tokens):
            next_token = sample(logits.float(), temperature, top_p, generator)
            masks.append(~done)
            tokens.append(torch.where(done, pad_token_id, next_token))
            done = done | (next_token == eos_token_id)
            if t == max_new_tokens - 1 or (t + 1) % check_every == 0 and all_done(done):
                break  # nothing more to sample: skip the forward
            logits = decode(tokens[-1], masks[-1])
    model.train(was_training)
    response_mask = torch.stack(masks, 1)
    length = int(response_mask.sum(1).max()) if check_every > 1 else response_mask.shape[1]  # tokens past EOS out
    return torch.stack(tokens, 1)[:, :length], response_mask[:, :length].long()


class Decoder:
    """The decode step of one rollout: the next token of each of N sequences into a KV cache allocated once for
    prompt + max_new_tokens (StaticCache, the prompts' prefill copied in), returning the next logits (N, V). Inputs
    live in buffers of fixed address and shape, and each step attends over the whole cache with a mask that shows
    the written positions only, so every step is the same computation on the same memory: what a CUDA graph
    replays. `cuda_graph`: the first step runs as it is, and records the graph that the next ones replay."""

    def __init__(self, model, prefix, prompt_mask, positions, num_samples: int, max_new_tokens: int, cuda_graph):
        num_prompt, flash = prompt_mask.shape[1], "flash" in model.config._attn_implementation
        self.cache = StaticCache(config=model.config, max_cache_len=num_prompt + max_new_tokens)
        for index, layer in enumerate(prefix.layers):  # each prompt's keys and values, once per sample
            keys, values = (x.repeat_interleave(num_samples, 0) for x in (layer.keys, layer.values))
            self.cache.update(keys, values, index)
        self.key_mask = prompt_mask.new_zeros(keys.shape[0], num_prompt + max_new_tokens, dtype=torch.bool)
        self.key_mask[:, :num_prompt] = prompt_mask.repeat_interleave(num_samples, 0).bool()
        self.position = positions.repeat_interleave(num_samples, 0)
        self.token, self.t, self.num_prompt = torch.zeros_like(self.position), 0, num_prompt
        self.model, self.flash, self.graph = model, flash, None
        if cuda_graph is None:  # by default on CUDA, where the policy is not sharded and no recording failed before
            cuda_graph = positions.device.type == "cuda" and not isinstance(model, FSDPModule) and graph_failure is None
        self.cuda_graph = cuda_graph and not flash  # flash-attn unpads: its shapes vary with the mask

    def __call__(self, token: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """Logits after `token` (N,): a real token in the rows where `written`, padding after EOS in the others."""
        self.token.copy_(token[:, None])
        self.key_mask[:, self.num_prompt + self.t] = written
        self.t += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.cuda_graph:
            return self.step()
        side = torch.cuda.Stream()  # the first step, the step's real result, warms up on a side stream (as torch's
        side.wait_stream(torch.cuda.current_stream())  # CUDA graph notes ask) before the graph records it
        with torch.cuda.stream(side):
            logits = self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # recording runs nothing: the step's state is as the first step left it
                self.logits = self.step()
            self.graph = graph
        except RuntimeError as e:  # a model whose forward waits for the GPU (a host sync) cannot be recorded
            global graph_failure
            self.cuda_graph, graph_failure = False, str(e).splitlines()[0]
            print0(f"note: decoding without a CUDA graph from now on, as recording the step failed: {graph_failure}")
        return logits

    def step(self) -> torch.Tensor:
        # every query sees the written keys, itself included: (N, 1, 1, K), or the key mask itself for flash-attn
        mask = self.key_mask if self.flash else for_attention(self.model, self.key_mask[:, None, None, :])
        logits = self.model(
            input_ids=self.token, attention_mask=mask, position_ids=self.position, use_cache=True, **{CACHE: self.cache}
        ).logits[:, -1]
        self.position.add_(1)
        return logits


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
