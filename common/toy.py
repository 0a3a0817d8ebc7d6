"""The embedded default task: sort the letters of the prompt.

A prompt is 3-6 distinct letters and "=", e.g. "dbca="; the ideal response is the letters sorted, "abcd".
The true reward gives partial credit: the fraction of positions that match the ideal response.
The reference policy rho, which wrote the demonstrations, sorts but swaps one adjacent pair half the time,
so its mean true reward is about 0.76: SFT should reach that level, alignment should go above it.

Everything is deterministic in its seed and needs no network: a character tokenizer shipped in
common/toy_tokenizer/ and a ~0.9M-parameter Llama made from `toy_config`.
"""

import functools
import random
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "toy_tokenizer"  # every printable ASCII character is one token
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUM_PROMPTS = {"train": 20000, "test": 512}
SPLIT_SEEDS = {"train": 0, "test": 1}


def toy_config(tokenizer):
    """The tiny Llama's config (transformers imported here, so that what needs only the task's data and reward, such as
    `python -m common.plot`, does not load it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def ideal_response(prompt: str) -> str:
    return "".join(sorted(prompt.rstrip("=")))


def true_reward(prompt: str, response: str) -> float:
    """Fraction of positions where the response matches the sorted letters (over the longer of the two)."""
    target = ideal_response(prompt)
    hits = sum(a == b for a, b in zip(response, target))
    return hits / max(len(target), len(response))


def rho_response(prompt: str, rng: random.Random, shifted: bool = False) -> str:
    """The imperfect reference policy: sorted, with one random adjacent pair swapped half the time. Shifted (the
    toy_shifted dataset): a noisier rho than the one the SFT data came from, which swaps a pair 90% of the time,
    then swaps another (anywhere) half the time, so a policy fitted to rho finds its responses unlikely."""
    letters = list(ideal_response(prompt))
    for probability in (0.9, 0.5) if shifted else (0.5,):
        if rng.random() < probability:
            i = rng.randrange(len(letters) - 1)
            letters[i], letters[i + 1] = letters[i + 1], letters[i]
    return "".join(letters)


def is_toy(dataset: str) -> bool:
    """toy, or toy_shifted: the toy task's prompts and true reward, with data from rho or from the noisier rho."""
    return dataset in ("toy", "toy_shifted")


@functools.cache
def prompts(split: str) -> tuple[str, ...]:
    """Distinct prompts; the test prompts never occur in the train split."""
    seen = set() if split == "train" else set(prompts("train"))
    rng, out = random.Random(SPLIT_SEEDS[split]), []
    while len(out) < NUM_PROMPTS[split]:
        prompt = "".join(rng.sample(LETTERS, rng.randint(3, 6))) + "="
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return tuple(out)


def records(split: str, kind: str, shifted: bool = False) -> list[dict]:
    """Records (common/data.py's format) for one setup kind: sft, pairwise, pointwise or prompt; shifted: the
    responses from the noisier rho (the toy_shifted dataset)."""
    rng = random.Random(SPLIT_SEEDS[split] + 100)
    out = []
    for prompt in prompts(split):
        row = {"prompt": prompt}
        if kind == "sft":  # demonstrations from rho
            row.update(generation1=rho_response(prompt, rng, shifted))
        elif kind == "pointwise":  # one rho sample, desirable when perfectly sorted
            response = rho_response(prompt, rng, shifted)
            row.update(generation1=response, generation1_reward=float(true_reward(prompt, response) == 1.0))
        elif kind == "pairwise":  # two rho samples with different true rewards, the better one first
            a, b = rho_response(prompt, rng, shifted), rho_response(prompt, rng, shifted)
            while true_reward(prompt, a) == true_reward(prompt, b):
                a, b = rho_response(prompt, rng, shifted), rho_response(prompt, rng, shifted)
            if true_reward(prompt, a) < true_reward(prompt, b):
                a, b = b, a
            row.update(generation1=a, generation2=b, generation1_reward=1.0, generation2_reward=0.0)
        out.append(row)
    return out
