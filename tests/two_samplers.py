"""Under torchrun: each process samples the same prompts from the same (sharded) toy policy with its OnlineSampler,
and rank 0 writes every process's responses as JSON to OUT (tests/test_generation.py):
    torchrun --nproc_per_node 2 tests/two_samplers.py OUT"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.distributed import cleanup, gather_objects, init_distributed, prepare_model  # noqa: E402
from common.generation import GenerationArgs  # noqa: E402
from common.model import load_causal_lm, load_tokenizer  # noqa: E402
from common.online import OnlineSampler  # noqa: E402

rank, world_size, device = init_distributed(seed=1)
tokenizer = load_tokenizer("toy")
policy = prepare_model(load_causal_lm("toy", tokenizer, device), device, torch.float32)
records = [{"prompt": p} for p in ("dbca=", "fedcba=", "dcb=", "ecadb=")]
sampler = OnlineSampler(
    records, tokenizer, GenerationArgs(max_new_tokens=8), None, size=4, group_size=2, max_prompt_length=16, seed=1,
    group_by_length=False, device=device,
)  # fmt: skip
prompts = [sampler.stream.row_at(i) for i in range(2)]  # the same two prompt rows on every process
responses = [[s["response"] for s in group] for group in sampler.sample(policy, prompts, num_samples=2)]
everyone = gather_objects({"prompts": [p["prompt"] for p in prompts], "responses": responses})
if rank == 0:
    Path(sys.argv[1]).write_text(json.dumps(everyone))
cleanup()
