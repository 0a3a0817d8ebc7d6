"""Log-probs of responses under a causal LM: the forwards every loss starts from, and the attention masks they use.

A prompt is left-padded (B, Tp); its padding positions come before any real token, so under a causal mask a padding
query has no key to see: a fully masked row of the attention matrix. Attention kernels differ on such rows, and on an
H100/H200 torch's preferred kernel for masked attention (cuDNN) returns NaN gradients for them at some sequence
lengths (pytorch/pytorch#196678). `attention_mask` gives every query itself to see, so no forward of ours has a fully
masked row; what a padding position computes reaches nothing, because no real token sees padding.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import DynamicCache

from common.batch import GENERATIONS, collate, interleave_responses, to_device
from common.distributed import all_reduce, decoder_layers

# the keyword of a forward's KV cache: `cache` from transformers 5.24, `past_key_values` (deprecated there) before
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def attention_mask(model, key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The causal attention mask of a forward whose num_queries queries are the last positions of key_mask (B, K)
    (1 a token, 0 padding), in which every query also sees itself (the module docstring): (B, 1, Q, K) bool for
    torch's scaled_dot_product_attention, additive for eager attention. flash-attn drops padded positions before
    attending, so it gets key_mask as it is; so does a batch without padding (transformers then uses is_causal)."""
    if "flash" in model.config._attn_implementation or bool(key_mask.all()):
        return key_mask
    num_keys = key_mask.shape[1]
    keys = torch.arange(num_keys, device=key_mask.device)
    queries = keys[num_keys - num_queries :, None]  # (Q, 1): each query's own position among the keys
    mask = (keys <= queries) & key_mask[:, None, :].bool() | (keys == queries)  # (B, Q, K)
    return for_attention(model, mask[:, None])  # (B, 1, Q, K): the same for every head


def for_attention(model, mask: torch.Tensor) -> torch.Tensor:
    """A (B, 1, Q, K) bool mask (True: the query sees the key) in the form the model's attention takes: as it is for
    torch's scaled_dot_product_attention, additive for eager attention."""
    if model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Run left-padded prompts (B, Tp) once into a new KV cache: (logits of each prompt's last token (B, 1, V), the
    cache, the position of the token after each prompt (B, 1)). Real tokens take positions 0, 1, ...; padding
    takes 0."""
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(
        input_ids=prompt_ids,
        attention_mask=attention_mask(model, prompt_mask, prompt_ids.shape[1]),
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{CACHE: cache},
    ).logits
    return logits, cache, positions[:, -1:] + 1


def response_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, with_stats=False
):
    """log pi(y_t | x, y_<t) for every response token: (B, K) tensor, zero outside the response, and the
    (B, K) response mask, where K counts positions from the batch's first response token on. The LM head
    runs only on the positions that predict those tokens, not on the prompts. input_ids (B, T) are right-padded, so
    every query sees the sequence's first token. with_stats: also the forward's per-token view, {"logps", "mask"} and
    `position_stats`, that a reweighter of the policy reads (common/reweight.py)."""
    first = max(int(response_mask.float().argmax(-1).min()), 1)  # earliest response token in the batch
    predicting = torch.arange(first - 1, input_ids.shape[1] - 1, device=input_ids.device)  # positions first-1 .. T-2
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=predicting).logits  # (B, K, V)
    mask = response_mask[:, first:]
    logps = token_logps(logits, input_ids[:, first:]) * mask
    if not with_stats:
        return logps, mask
    return logps, mask, {"logps": logps, "mask": mask} | {k: v * mask for k, v in position_stats(logits).items()}


def shared_prompt_logps(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_stats: bool = False,
):
    """log pi(y_t | x, y_<t) for every response token of several responses per prompt: (N, Tr), zero at padding.
    prompt_ids (B, Tp) left-padded; response_ids (N, Tr) right-padded, N = n * B, with prompt i's n responses
    at rows i*n .. i*n + n - 1 (common.batch.interleave_responses). The prompt runs once and its KV cache
    serves its n responses, so a pair costs P + 2R tokens of compute instead of 2(P + R) (prefix sharing).
    Gradient checkpointing keeps no cache: then each response runs after its own copy of the prompt.
    With a temperature, of the distribution sampled from (logits / temperature); with_stats, also the per-token view
    that a reweighter of the policy reads (common/reweight.py): {"logps", "mask"} and `position_stats` of that
    distribution at each response token (those without gradient)."""
    n, (num_prompt, num_response) = (
        response_ids.shape[0] // prompt_ids.shape[0],
        (prompt_ids.shape[1], response_ids.shape[1]),
    )
    key_mask = torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask], 1)  # (N, Tp + Tr)

    def score(logits, labels):  # (log-probs (N, K), stats) of labels under logits / temperature
        logits = logits / temperature if temperature != 1.0 else logits
        return token_logps(logits, labels), position_stats(logits) if with_stats else None

    if any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model)):  # the layers' switch
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=torch.cat([prompt_ids.repeat_interleave(n, 0), response_ids], 1),
            attention_mask=attention_mask(model, key_mask, num_prompt + num_response),
            position_ids=positions,
            logits_to_keep=torch.arange(num_prompt - 1, num_prompt + num_response - 1, device=prompt_ids.device),
        ).logits
        logps, stats = score(logits, response_ids)
    else:
        first, cache, next_position = prefill(model, prompt_ids, prompt_mask)  # first: (B, 1, V)
        # these logits must reach the loss: FSDP2 gathers a layer's parameters for backward through hooks on the
        # layer's outputs; were they unused, the backward through the cache would find the last layer resharded
        cache.batch_repeat_interleave(n)  # the prompt's keys and values, once per response
        response_positions = next_position.repeat_interleave(n, 0) + torch.arange(num_response, device=key_mask.device)
        rest = model(  # every response query sees its prompt's tokens: the key mask is enough
            input_ids=response_ids,
            attention_mask=key_mask,
            position_ids=response_positions,
            use_cache=True,
            logits_to_keep=torch.arange(num_response - 1, device=response_ids.device),
            **{CACHE: cache},
        ).logits  # (N, Tr - 1, V)
        scored = score(first.repeat_interleave(n, 0), response_ids[:, :1]), score(rest, response_ids[:, 1:])
        logps = torch.cat([scored[0][0], scored[1][0]], 1)
        stats = (
            {key: torch.cat([scored[0][1][key], scored[1][1][key]], 1) for key in scored[0][1]} if with_stats else None
        )
    logps = logps * response_mask
    if not with_stats:
        return logps
    return logps, {"logps": logps, "mask": response_mask} | {k: v * response_mask for k, v in stats.items()}


@torch.no_grad()
def precompute_logps(model, rows: list[dict], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """Every response's summed log-prob under `model`, (len(rows), G) for token rows with G generations, on the CPU:
    what a script computes once before training so that it needs no reference model (or behaviour model,
    common/reweight.py) in memory, and keeps in a table of its own. Each process scores an equal share (FSDP forwards
    are collectives, so every process runs as many), and a sum over processes gives everyone all."""
    generations = [g for g in GENERATIONS if f"{g}_response_ids" in rows[0]]
    rank, world_size, device = dist.get_rank(), dist.get_world_size(), next(model.parameters()).device
    share = math.ceil(len(rows) / world_size)
    mine = list(range(rank * share, min(len(rows), (rank + 1) * share)))
    logps = torch.zeros(len(rows), len(generations), dtype=torch.float64)
    for start in range(0, share, batch_size):
        index = mine[start : start + batch_size]
        batch = to_device(collate([rows[i] for i in index or [0]], pad_token_id), device)  # a dummy keeps step
        # every generation of the batch in one forward that runs each prompt once
        inputs = batch["prompt_token_ids"], batch["prompt_attention_mask"], *interleave_responses(batch, generations)
        sums = shared_prompt_logps(model, *inputs).sum(-1).view(-1, len(generations))  # (B, G)
        logps[index] = sums[: len(index)].double().cpu()
    return all_reduce(logps).float()


def token_values(critic, prompt_ids, prompt_mask, response_ids, response_mask):
    """V(x, y_<t) for every response token t, (N, Tr), zero at padding: the critic's head on the hidden state that
    predicts token t. Prompts (B, Tp) as in shared_prompt_logps, N = n * B."""
    n, num_prompt = response_ids.shape[0] // prompt_ids.shape[0], prompt_ids.shape[1]
    key_mask = torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask], 1)
    values = critic(
        input_ids=torch.cat([prompt_ids.repeat_interleave(n, 0), response_ids], 1),
        attention_mask=attention_mask(critic, key_mask, key_mask.shape[1]),  # left padding sees itself
        position_ids=(key_mask.cumsum(-1) - 1).clamp(min=0),
    ).logits[:, num_prompt - 1 : -1, 0]
    return values.float() * response_mask


@torch.no_grad()
def position_stats(logits: torch.Tensor) -> dict:
    """Of the distribution p = softmax(logits) at each position, (..., V) -> (...) each, in fp32:
    entropy = -sum_v p_v log p_v, and log_p2 = log sum_v p_v^2 (the probability that two samples agree: WPO's
    normaliser, common/reweight.py)."""
    logps = torch.log_softmax(logits.float(), -1)
    return {"entropy": -(logps.exp() * logps).sum(-1), "log_p2": torch.logsumexp(2 * logps, -1)}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] at each position: (B, K, V), (B, K) -> (B, K), in fp32."""
    return -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(labels.shape)
