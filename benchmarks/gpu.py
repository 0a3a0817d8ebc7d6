"""Our scripts against TRL's trainers on one GPU, bf16 on both sides, on a ~0.37B Llama (Qwen2.5-0.5B's body:
hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, tied embeddings; random init, seed 0, fp32 weights) with
the CPU benchmark's tokenizer (its 8192 tokens are the model's vocabulary: 365M parameters), HH pairs and reward
model (benchmarks/workload.py).

Pairs (ours / TRL), each side a subprocess on the same model folder, data and settings:

    sft           sft.py / SFTTrainer                                64 sequences a step
    reward_model  reward_model.py / RewardTrainer                    16 pairs a step
    dpo           dpo_pairwise.py / DPOTrainer                       16 pairs a step
    kto           kto_pointwise.py / KTOTrainer                      32 examples a step
    online_dpo    dpo_pairwise.py --online / OnlineDPOTrainer        16 prompts x 2 samples (16 pairs) a step
    grpo          rl_ppo.py --estimator grpo / GRPOTrainer           8 prompts x 4 samples (32 responses) a step
    decode        common.generation.generate / transformers' generate (what TRL's trainers sample with), alone:
                  16 prompts x 2 samples of 128 tokens at temperature 1, prefill included, in this process

Shared settings: max_length 256, max_prompt_length 128, learning rate 1e-5 with 5 warmup steps, seed 1; online:
128 new tokens at temperature 1, scored by the workload's reward model (rm/). Ours: --dtype bf16, --log_every 1,
no evaluation. TRL: bf16=True, gradient_checkpointing=False (TRL defaults to on, ours to off), otherwise its
defaults; GRPO with beta=0.05 and loss_type="grpo" (ours' --kl_coef and estimator), transformers' generate (no vLLM).
DPO and KTO: TRL runs its reference model every step (its default), ours scores the reference once before training
(its default), before the timed window.

Definitions, the same on both sides:
- ms/step: the wall seconds between the ends of optimizer steps a and b over b - a, so start-up, the first steps
  and the end of the run are left out (offline a = 5, b = 20 of 20 steps; online a = 2, b = 6 of 6). Ours: `time`
  of steps a and b in <output_dir>/metrics.jsonl (--log_every 1). TRL: a callback stamps time.perf_counter() at
  on_step_end, after torch.cuda.synchronize().
- units/s: units a step (sequences, pairs, examples, responses) over seconds a step.
- tokens/s: units/s times the mean tokens of a unit's training sequences, prompt + response + EOS each, a pair
  counting its two sequences, counted with the workload's tokenizer on the data file both sides read. Online: prompt
  + 128 per sampled response, an upper bound (a response can end early at EOS; ours' logged mean length is printed).
- MFU: 6 N tokens/s over the device's peak dense bf16 FLOP/s (H100/H200 SXM 989e12, A100 312e12, or
  --peak_tflops), N the model's parameter count. None on CPU.
- peak memory: torch.cuda.max_memory_allocated() at the end of training (TRL: read by the callback at train end;
  ours: the largest `memory/max_allocated_gib` in metrics.jsonl, n/a where the script does not log it).

    python benchmarks/gpu.py                          # every pair, meant to fit in ~8 min on one H200
    python benchmarks/gpu.py --pairs sft dpo --out $OUT
    python benchmarks/gpu.py --small                  # a 2-layer model and a few steps: a smoke test, e.g. on CPU
    python benchmarks/gpu.py --pairs dpo --profile --out $OUT   # ours under torch.profiler instead: where time goes

decode: ms per token step (the rollout's seconds over its longest response, so the prompts' prefill and, ours, the
CUDA graph's recording are in it) and generated tokens/s, on the benchmark model under bf16 autocast over its fp32
weights, as both sides train; ours with the decode step replayed as a CUDA graph (its default on CUDA) and without,
and whether greedy decoding gives the same tokens on the three (rows identical of 32; bf16 rounding can part them).

On a GPU it first checks the lead of the NaN that offline DPO and KTO trained into (pytorch/pytorch#196678): torch's
cuDNN attention backward with a fully masked query row (a left-padded prompt under a causal mask) at key lengths 64,
128 and 192, bf16, against the memory-efficient kernel and against the mask our forwards pass (every query sees
itself, common/logps.py): whether the query gradient is finite. Ours' DPO and KTO print how long their reference
precompute took (before the timed window); it is shown under the pair.

Needs trl, tyro and datasets: where they are missing and the project's root holds .whl/ (`bash
../shared/gpu/prepare.sh`), they are installed from there into /tmp/gpu-site. The workload, the model, every run's
output and logs go to --work (default benchmarks/.work-gpu/); --out DIR gets a tarball of the logs and metrics and
the printed summary. Each pair measured on both sides appends a line to benchmarks/results.jsonl (with --small, a
2-layer model, steps 1 to 3 offline and 1 to 2 online, 16 new tokens: only with --record).
"""

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import workload

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.jsonl"
WORK = ROOT / "benchmarks" / ".work-gpu"
SITE = Path("/tmp/gpu-site")  # where the wheels of .whl/ are installed
# name -> (our script, data file in the work folder, unit, units a step: per_device_batch_size on both sides)
PAIRS = {
    "sft": ("sft.py", "sft.jsonl", "sequences", 64),
    "reward_model": ("reward_model.py", "pairwise.jsonl", "pairs", 16),
    "dpo": ("dpo_pairwise.py", "pairwise.jsonl", "pairs", 16),
    "kto": ("kto_pointwise.py", "pointwise.jsonl", "examples", 32),
    "online_dpo": ("dpo_pairwise.py", "pairwise.jsonl", "pairs", 16),  # 16 prompts, 2 samples each
    "grpo": ("rl_ppo.py", "pairwise.jsonl", "responses", 32),  # both sides count responses: 8 prompts x 4
}
ONLINE = ("online_dpo", "grpo")
# the timed window (a, b): the seconds between the ends of optimizer steps a and b; a run makes b steps
WINDOW = {"offline": (5, 20), "online": (2, 6)}
SMALL_WINDOW = {"offline": (1, 3), "online": (1, 2)}
MAX_NEW_TOKENS, SMALL_MAX_NEW_TOKENS = 128, 16
LEARNING_RATE, WARMUP_STEPS, NUM_SAMPLES, KL_COEF = 1e-5, 5, 4, 0.05
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, datasheets
CLOCK = "TRL_CLOCK "  # the TRL side's one line of output that this script reads


def window(pair: str, small: bool) -> tuple[int, int]:
    return (SMALL_WINDOW if small else WINDOW)["online" if pair in ONLINE else "offline"]


def max_new_tokens(small: bool) -> int:
    return SMALL_MAX_NEW_TOKENS if small else MAX_NEW_TOKENS


def model_dir(work: Path, small: bool) -> Path:
    return work / ("model-small" if small else "model")


def install_missing_packages():
    """trl, tyro and datasets from the wheels in .whl/ (prepare.sh) when this Python lacks them, on sys.path here
    and on PYTHONPATH for the subprocesses."""
    if all(find_spec(name) for name in ("trl", "tyro", "datasets")):
        return
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise SystemExit("error: trl, tyro or datasets missing, and no .whl/ in the project's root (prepare.sh)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
        + ["--target", str(SITE), *map(str, wheels)],
        check=True,
    )
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()


def build_model(work: Path, small: bool) -> Path:
    """The benchmark's Llama in the workload tokenizer's folder layout (written once): Qwen2.5-0.5B's body, or with
    --small a 2-layer one; the vocabulary is the tokenizer's."""
    out = model_dir(work, small)
    if (out / "model.safetensors").exists():
        return out
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work)
    if small:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    else:
        shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)  # fp32 safetensors; model.safetensors last: its presence means the folder is complete
    return out


def num_parameters(model: Path) -> int:
    """N of MFU: every parameter, the tied embedding once (it is the LM head's matrix)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).num_parameters()


def tokens_per_unit(pair: str, work: Path, small: bool, tokenizer) -> float:
    """Mean tokens of one unit's training sequences, prompt + response + EOS each (a pair: its two sequences; online:
    prompt + max_new_tokens per response, an upper bound), on the data file both sides read."""
    rows = [json.loads(line) for line in open(work / PAIRS[pair][1])]
    length = lambda text: len(tokenizer(text)["input_ids"])
    if pair in ONLINE:
        sequences = 2 if pair == "online_dpo" else 1
        return sequences * (sum(length(row["prompt"]) for row in rows) / len(rows) + max_new_tokens(small))
    responses = ("chosen", "rejected") if pair in ("reward_model", "dpo") else ("completion",)
    return sum(length(row["prompt"]) + length(row[k]) + 1 for row in rows for k in responses) / len(rows)


def our_command(pair: str, work: Path, small: bool) -> list[str]:
    script, data, _, batch_size = PAIRS[pair]
    steps = window(pair, small)[1]
    command = [sys.executable, script, "--model_name_or_path", str(model_dir(work, small)), "--dataset"]
    command += [str(work / data), "--output_dir", str(work / "runs" / f"{pair}-ours"), "--max_steps", str(steps)]
    command += ["--per_device_batch_size", str(batch_size), "--learning_rate", str(LEARNING_RATE)]
    command += ["--warmup_steps", str(WARMUP_STEPS), "--seed", "1"]
    if pair != "grpo":  # rl_ppo.py has no --max_length: its samples' length is --generation.max_new_tokens
        command += ["--max_length", str(workload.MAX_LENGTH)]
    command += ["--max_prompt_length", str(workload.MAX_PROMPT_LENGTH), "--dtype", "bf16", "--log_every", "1"]
    command += ["--eval_every", "1000000"]
    if pair != "reward_model":  # reward_model.py samples nothing
        command += ["--eval.num_prompts", "0"]
    if pair in ONLINE:
        command += ["--annotator", f"reward_model:{work / 'rm'}", "--generation.temperature", "1.0"]
        command += ["--generation.max_new_tokens", str(max_new_tokens(small))]
    if pair == "online_dpo":
        command += ["--online"]
    if pair == "grpo":  # one rollout, one pass, one optimizer step a step; no score for a missing EOS (TRL has none)
        command += ["--estimator", "grpo", "--num_samples", str(NUM_SAMPLES), "--num_ppo_epochs", "1"]
        command += ["--num_minibatches", "1", "--missing_eos_penalty", "None", "--kl_coef", str(KL_COEF)]
    return command


def decode_benchmark(model_path: Path, work: Path, small: bool) -> tuple[list[str], dict]:
    """decode (the module docstring): the printed lines, and ours (with the graph) against transformers' generate."""
    sys.path.insert(0, str(ROOT))
    from common.batch import pad
    from common.distributed import prepare_model
    from common.generation import generate
    from common.model import load_causal_lm, load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(str(model_path))
    model = prepare_model(load_causal_lm(str(model_path), tokenizer, device), device, torch.bfloat16, shard=False)
    rows = [json.loads(line) for line in open(work / "pairwise.jsonl")][:16]
    prompts = pad([tokenizer(row["prompt"])["input_ids"] for row in rows], tokenizer.pad_token_id, left=True)
    prompt_ids, prompt_mask = (x.to(device) for x in prompts)
    new_tokens, ids = max_new_tokens(small), (tokenizer.eos_token_id, tokenizer.pad_token_id)
    options = dict(max_new_tokens=new_tokens, eos_token_id=ids[0], pad_token_id=ids[1], num_samples=2)

    def ours(graph: bool, temperature: float, seed: int):
        generator = torch.Generator(device).manual_seed(seed)
        return generate(
            model, prompt_ids, prompt_mask, **options, temperature=temperature, generator=generator, cuda_graph=graph
        )

    def transformers_generate(temperature: float, seed: int):
        torch.manual_seed(seed)
        greedy = dict(do_sample=False)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else greedy
        out = model.generate(
            input_ids=prompt_ids.repeat_interleave(2, 0),
            attention_mask=prompt_mask.repeat_interleave(2, 0),
            max_new_tokens=new_tokens,
            eos_token_id=ids[0],
            pad_token_id=ids[1],
            **sampling,
        )[:, prompt_ids.shape[1] :]
        return out, (out != ids[1]).long()  # EOS differs from padding in the workload's tokenizer

    def timed(sample) -> dict:
        sample(1.0, 0)  # a warm-up rollout
        seconds, steps, tokens = 0.0, 0, 0
        for seed in range(1, 4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _, mask = sample(1.0, seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            steps, tokens = steps + mask.shape[1], tokens + int(mask.sum())
        return dict(ms_per_token_step=1000 * seconds / steps, tokens_per_s=tokens / seconds)

    sides = {
        "ours, CUDA graph": lambda t, s: ours(True, t, s),
        "ours, no graph": lambda t, s: ours(False, t, s),
        "transformers generate": transformers_generate,
    }
    if device.type != "cuda":
        del sides["ours, CUDA graph"]
    results = {name: timed(sample) for name, sample in sides.items()}
    greedy = {name: sample(0.0, 0)[0] for name, sample in sides.items()}
    lines = [f"\ndecode: 32 sequences (16 prompts x 2) x {new_tokens} new tokens, temperature 1, bf16 autocast"]
    lines += ["| side | ms per token step | generated tokens/s |", "|---|---|---|"]
    lines += [f"| {n} | {r['ms_per_token_step']:.2f} | {r['tokens_per_s']:,.0f} |" for n, r in results.items()]
    names = list(greedy)
    for a, b in zip(names, names[1:] + names[:1]) if len(names) > 2 else [names]:
        width = min(greedy[a].shape[1], greedy[b].shape[1])
        same = int((greedy[a][:, :width] == greedy[b][:, :width]).all(-1).sum())
        lines.append(f"greedy: {a} and {b} give the same tokens in {same} of {greedy[a].shape[0]} rows")
    ours_name = "ours, CUDA graph" if device.type == "cuda" else "ours, no graph"
    return lines, dict(ours=results[ours_name], theirs=results["transformers generate"])


def attention_probe() -> list[str]:
    """One line per (key length, mask, backend): is scaled_dot_product_attention's query gradient finite in bf16? The
    masks are causal over a batch of left-padded rows (row b has b * length / 4 padding positions), as transformers
    builds them (fully masked rows) and as common.logps.attention_mask does (every query also sees itself)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines = ["attention backward in bf16, query gradient finite? (fully masked rows: pytorch/pytorch#196678)"]
    for length in (64, 128, 192):
        positions = torch.arange(length, device="cuda")
        key_mask = positions[None, :] >= (torch.arange(4, device="cuda") * length // 4)[:, None]  # (4, L)
        causal = (positions[None, :] <= positions[:, None]) & key_mask[:, None, :]  # (4, L, L)
        for name, mask in (
            ("fully masked rows", causal),
            ("every query sees itself", causal | torch.eye(length, device="cuda").bool()),
        ):
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                torch.manual_seed(0)
                q, k, v = (
                    torch.randn(4, 14, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3)
                )
                try:
                    with sdpa_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, mask[:, None]).sum().backward()
                    verdict = "finite" if torch.isfinite(q.grad).all() else "NaN/inf"
                except RuntimeError as e:
                    verdict = f"unavailable ({str(e).splitlines()[0][:60]})"
                lines.append(f"  key length {length:3d}, {name:24s} {backend.name:20s} {verdict}")
    return lines


def profile_side(pair: str, work: Path, small: bool):
    """Ours' side of the pair in this process under torch.profiler, recording the optimizer steps of the timed window
    (after its first), and the table of where their time went: work/logs/profile-PAIR.txt."""
    import runpy

    from torch.optim.lr_scheduler import LRScheduler

    a, b = window(pair, small)
    activities = [torch.profiler.ProfilerActivity.CPU] + [
        torch.profiler.ProfilerActivity.CUDA
    ] * torch.cuda.is_available()
    # every script steps its learning-rate scheduler once a step (and once when it is made): the profiler's clock
    profiler = torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=a, warmup=1, active=b - a - 1, repeat=1)
    )
    scheduler_step = LRScheduler.step

    def step(self, *args, **kwargs):
        scheduler_step(self, *args, **kwargs)
        profiler.step()

    LRScheduler.step = step
    command = our_command(pair, work, small)
    sys.argv = command[1:]
    sys.path.insert(0, str(ROOT))
    with profiler:
        runpy.run_path(str(ROOT / command[1]), run_name="__main__")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=40)
    (work / "logs" / f"profile-{pair}.txt").write_text(f"{' '.join(command)}\nsteps {a + 2}-{b}\n{table}\n")
    print(table, flush=True)


def trl_side(pair: str, work: Path, small: bool):
    """TRL's trainer for the pair, in this process; prints CLOCK and {"stamps": {step: perf_counter at the step's
    end}, "max_allocated_gib": peak GPU memory, or null on CPU} at train end."""
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = {}

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps[state.global_step] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            print(CLOCK + json.dumps({"stamps": self.stamps, "max_allocated_gib": peak}), flush=True)

    _, data, _, batch_size = PAIRS[pair]
    model = str(model_dir(work, small))
    common = dict(
        output_dir=str(work / "runs" / f"{pair}-trl"),
        max_steps=window(pair, small)[1],
        per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS,
        seed=1,
        bf16=True,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),  # TRL's configs refuse bf16 on CPU without it
        save_strategy="no",
        report_to="none",
    )
    if pair == "online_dpo":  # imported only when chosen: trl.experimental warns on import
        from trl.experimental import online_dpo

        config_class, trainer_class = online_dpo.OnlineDPOConfig, online_dpo.OnlineDPOTrainer
    else:
        config_class, trainer_class = {
            "sft": (trl.SFTConfig, trl.SFTTrainer),
            "reward_model": (trl.RewardConfig, trl.RewardTrainer),
            "dpo": (trl.DPOConfig, trl.DPOTrainer),
            "kto": (trl.KTOConfig, trl.KTOTrainer),
            "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        }[pair]
    method = {  # online: sampling with transformers' generate
        "online_dpo": dict(max_new_tokens=max_new_tokens(small), temperature=1.0, use_vllm=False),
        "grpo": dict(  # the KL to the reference in the loss (beta > 0: a reference model, run every step)
            num_generations=NUM_SAMPLES,
            beta=KL_COEF,
            loss_type="grpo",  # each response's token mean, then the mean over responses: ours' --estimator grpo
            max_completion_length=max_new_tokens(small),
            temperature=1.0,
            use_vllm=False,
        ),
    }.get(pair, {})
    if pair != "grpo":  # GRPOConfig has no max_length
        method["max_length"] = workload.MAX_LENGTH
    dataset = load_dataset("json", data_files=str(work / data), split="train")
    online = {}
    if pair in ONLINE:  # the prompts only, scored by the workload's reward model
        dataset = dataset.select_columns(["prompt"])
        online = dict(reward_funcs=str(work / "rm"), processing_class=AutoTokenizer.from_pretrained(model))
    trainer = trainer_class(
        model=model, args=config_class(**common, **method), train_dataset=dataset, callbacks=[Clock()], **online
    )
    trainer.train()


def run(command: list[str], log: Path, timeout: int, env: dict) -> str | None:
    """Runs command with its output to log; None if it exited 0, else why not (the log's last error line)."""
    with open(log, "w") as f:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its session: the run and anything it started
            process.wait()
            return f"timed out after {timeout} s"
    return f"exit code {code}: {last_error(log)}" if code else None


def last_error(log: Path) -> str:
    """The log's last `error:` line or exception line, else its last line."""
    lines = [line.strip() for line in open(log, errors="replace") if line.strip()]
    errors = [line for line in lines if re.match(r"(error\b|Traceback|[\w.]+(Error|Exception)\b)", line, re.I)]
    return ((errors or lines or ["(empty log)"])[-1])[:200]


def our_measurement(pair: str, work: Path, small: bool, log: Path) -> dict:
    """seconds between the ends of steps a and b, peak GPU memory (None where not logged) and mean sampled
    response length (online, None where not logged) from ours' metrics.jsonl; the reference precompute's
    (count, what, seconds) from its log, where it printed one."""
    a, b = window(pair, small)
    lines = [json.loads(line) for line in open(work / "runs" / f"{pair}-ours" / "metrics.jsonl")]
    times = {line["step"]: line["time"] for line in lines}
    peaks = [line["memory/max_allocated_gib"] for line in lines if "memory/max_allocated_gib" in line]
    precompute = re.findall(r"reference log-probs of (\d+) (\w+).* in ([\d.]+) s", log.read_text(errors="replace"))
    lengths = [
        line["online/response_length"] for line in lines if a < line["step"] <= b and "online/response_length" in line
    ]
    return dict(
        seconds=times[b] - times[a],
        peak_gib=max(peaks, default=None),
        response_length=sum(lengths) / len(lengths) if lengths else None,
        precompute=[int(precompute[-1][0]), precompute[-1][1], float(precompute[-1][2])] if precompute else None,
    )


def trl_measurement(pair: str, log: Path, small: bool) -> dict:
    a, b = window(pair, small)
    # the line may follow a progress bar's last update on the same line
    clock = [json.loads(line.partition(CLOCK)[2]) for line in open(log, errors="replace") if CLOCK in line]
    if not clock:
        raise ValueError(f"no {CLOCK.strip()} line in {log}")
    stamps = clock[-1]["stamps"]
    return dict(seconds=stamps[str(b)] - stamps[str(a)], peak_gib=clock[-1]["max_allocated_gib"])


def commit() -> str:
    """HEAD's short hash, +edits when the code differs from it (results.jsonl aside), as run.py records it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "diff", "--name-only", "HEAD", "--", ".", ":!benchmarks/results.jsonl"], cwd=ROOT, capture_output=True
    )
    return head.stdout.strip() + ("+edits" if dirty.stdout.strip() else "")


def cell(value, form: str) -> str:
    return "n/a" if value is None else form.format(value)


def measure(pair: str, side: str, args, env: dict, tokens: float, params: int, peak_flops: float | None):
    """Runs one side of a pair: its measurements (dict), or why there are none (str)."""
    work, small = args.work, args.small
    name = f"{pair}-{side.lower()}"
    log = work / "logs" / f"{name}.log"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    if side == "ours":
        command = our_command(pair, work, small)
    else:
        command = [sys.executable, __file__, "--trl_side", pair, "--work", str(work)] + ["--small"] * small
    failure = run(command, log, args.timeout, env)
    if failure:
        return failure
    try:
        measured = our_measurement(pair, work, small, log) if side == "ours" else trl_measurement(pair, log, small)
    except (OSError, KeyError, ValueError) as e:
        return f"no timing: {type(e).__name__}: {e}"
    a, b = window(pair, small)
    units_per_s = PAIRS[pair][3] * (b - a) / measured["seconds"]
    return measured | dict(
        ms_per_step=1000 * measured["seconds"] / (b - a),
        units_per_s=units_per_s,
        tokens_per_s=tokens * units_per_s,
        mfu=6 * params * tokens * units_per_s / peak_flops if peak_flops else None,
    )


def table_rows(pair: str, small: bool, ours: dict | str, theirs: dict | str) -> list[str]:
    """The pair's rows: each side's measurements or failure, then ours / TRL of units/s and peak memory."""
    unit, (a, b) = PAIRS[pair][2], window(pair, small)
    rows = []
    for side, r in (("ours", ours), ("TRL", theirs)):
        label = f"{pair} ({unit}, {a}-{b})" if side == "ours" else ""
        if isinstance(r, str):
            rows.append(f"| {label} | {side} | failed: {r} | | | | |")
            continue
        rows.append(
            f"| {label} | {side} | {r['ms_per_step']:.0f} | {r['units_per_s']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {cell(r['mfu'], '{:.1%}')} | {cell(r['peak_gib'], '{:.1f} GiB')} |"
        )
    if isinstance(ours, dict) and isinstance(theirs, dict):
        speed, memory = ratios(ours, theirs)
        rows.append(f"| | ours/TRL | | {speed:.2f} | | | {cell(memory, '{:.2f}')} |")
    if isinstance(ours, dict) and ours["precompute"] is not None:
        count, what, seconds = ours["precompute"]
        rows.append(
            f"| | (ours' reference precompute, before the window: {count} {what} in {seconds:.1f} s) | | | | | |"
        )
    if isinstance(ours, dict) and ours["response_length"] is not None:
        rows.append(f"| | (ours' mean sampled response: {ours['response_length']:.1f} tokens) | | | | | |")
    return rows


def ratios(ours: dict, theirs: dict) -> tuple[float, float | None]:
    """ours / TRL of units/s and of peak memory (None unless both sides logged it)."""
    memory = ours["peak_gib"] / theirs["peak_gib"] if ours["peak_gib"] and theirs["peak_gib"] else None
    return ours["units_per_s"] / theirs["units_per_s"], memory


def append_result(pair: str, unit: str, small: bool, device: str, versions: dict, measured: dict):
    """One line of benchmarks/results.jsonl, in run.py's style (ours, trl, ratio) plus the GPU measurements."""
    line = {
        "pair": pair,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": f"{device}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
        "unit": unit,
        **measured,
        "device": device,
        "small": small,
        "versions": versions,
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}) + "\n")


def record(pair: str, small: bool, device: str, versions: dict, ours: dict, theirs: dict):
    """A pair's line: units/s of both sides and their ratio, and each side's GPU measurements."""
    speed, memory = ratios(ours, theirs)
    measured = dict(ours=ours["units_per_s"], trl=theirs["units_per_s"], ratio=speed, memory_ratio=memory)
    measured["window"] = window(pair, small)
    for name in ("ms_per_step", "tokens_per_s", "mfu", "peak_gib"):
        measured |= {f"ours_{name}": ours[name], f"trl_{name}": theirs[name]}
    if ours["precompute"] is not None:
        measured["ours_precompute_seconds"] = ours["precompute"][2]
    append_result(pair, PAIRS[pair][2], small, device, versions, measured)


def record_decode(small: bool, device: str, versions: dict, ours: dict, theirs: dict):
    """decode's line: generated tokens/s of ours (CUDA graph) and transformers' generate, and ms per token step."""
    measured = dict(ours=ours["tokens_per_s"], trl=theirs["tokens_per_s"])
    measured["ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    measured |= dict(
        ours_ms_per_token_step=ours["ms_per_token_step"], trl_ms_per_token_step=theirs["ms_per_token_step"]
    )
    append_result("decode", "generated tokens", small, device, versions, measured)


def measure_pairs(args, env, tokenizer, params, peak_flops, device, versions, start, say):
    """Both sides of every pair of args.pairs, then the table; each pair measured on both sides goes to results.jsonl
    (not with --small, unless --record)."""
    results = {}
    for pair in args.pairs:
        tokens = tokens_per_unit(pair, args.work, args.small, tokenizer)
        for side in ("ours", "TRL"):
            results[pair, side] = measure(pair, side, args, env, tokens, params, peak_flops)
            status = results[pair, side] if isinstance(results[pair, side], str) else "done"
            say(f"[{time.time() - start:.0f} s] {pair} {side}: {status}")

    say(
        "\nms/step between the ends of steps a and b; tokens/s = units/s x mean tokens of a unit's sequences "
        f"(online: prompt + {max_new_tokens(args.small)} per response, an upper bound); MFU = 6 N tokens/s / peak\n"
        "\n| pair (unit, a-b) | side | ms/step | units/s | tokens/s | MFU | peak GPU memory |"
        "\n|---|---|---|---|---|---|---|"
    )
    for pair in args.pairs:
        ours, theirs = results[pair, "ours"], results[pair, "TRL"]
        for row in table_rows(pair, args.small, ours, theirs):
            say(row)
        if isinstance(ours, dict) and isinstance(theirs, dict) and (args.record or not args.small):
            record(pair, args.small, device, versions, ours, theirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs", nargs="+", choices=[*PAIRS, "decode"], default=[*PAIRS, "decode"], help="which pairs to run"
    )
    parser.add_argument("--small", action="store_true", help="a 2-layer model and a few steps: a smoke test")
    parser.add_argument(
        "--data",
        type=Path,
        default=workload.DATA if workload.DATA.exists() else ROOT / ".gpu" / "hh-rlhf-harmless-base-test.jsonl.gz",
        help="the HH-RLHF jsonl.gz the workload is built from (default: ../shared/data's, else .gpu/'s)",
    )
    parser.add_argument("--work", type=Path, default=WORK, help="workload, model, runs and logs (built if missing)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds a run may take before it is stopped")
    parser.add_argument("--out", type=Path, help="folder for gpu-logs.tgz (logs, metrics) and gpu-summary.txt")
    parser.add_argument("--peak_tflops", type=float, help="the device's peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--record", action="store_true", help="append to results.jsonl with --small too")
    parser.add_argument("--profile", action="store_true", help="ours under torch.profiler, no TRL, nothing recorded")
    parser.add_argument("--trl_side", choices=PAIRS, help="run only TRL's side of this pair, in this process")
    parser.add_argument("--profile_side", choices=PAIRS, help="run only ours' side under the profiler, in this process")
    args = parser.parse_args()
    args.work = args.work.resolve()
    if args.trl_side:
        trl_side(args.trl_side, args.work, args.small)
        return
    if args.profile_side:
        profile_side(args.profile_side, args.work, args.small)
        return

    start, printed = time.time(), []

    def say(text: str):
        print(text, flush=True)
        printed.append(text)

    install_missing_packages()
    if not (args.work / "pointwise.jsonl").exists():  # workload.build writes it last
        workload.build(args.work, args.data)
    model = build_model(args.work, args.small)
    params, tokenizer = num_parameters(model), PreTrainedTokenizerFast.from_pretrained(args.work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak_flops = next((flops for name, flops in PEAK_FLOPS.items() if name in device), None)
    if args.peak_tflops and device != "cpu":
        peak_flops = args.peak_tflops * 1e12
    versions = {name: version(name) for name in ("torch", "transformers", "trl")}
    say(
        f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {model}: {params / 1e6:.1f}M "
        f"parameters; peak bf16 {cell(peak_flops and peak_flops / 1e12, '{:.0f} TFLOP/s')}"
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        for line in attention_probe():
            say(line)
    decode, args.pairs = "decode" in args.pairs, [pair for pair in args.pairs if pair != "decode"]
    if args.profile:
        for pair in args.pairs:
            profile = args.work / "logs" / f"profile-{pair}"
            command = [sys.executable, __file__, "--profile_side", pair, "--work", str(args.work)]
            failure = run(command + ["--small"] * args.small, profile.with_suffix(".log"), args.timeout, env)
            say(f"[{time.time() - start:.0f} s] {pair} profiled: {failure or profile.with_suffix('.txt')}")
    else:
        if decode:
            lines, sides = decode_benchmark(model, args.work, args.small)
            for line in lines:
                say(line)
            if args.record or not args.small:
                record_decode(args.small, device, versions, **sides)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the benchmark model's memory, before the pairs' runs
        measure_pairs(args, env, tokenizer, params, peak_flops, device, versions, start, say)
    say(f"\n[{time.time() - start:.0f} s] done; logs in {args.work / 'logs'}")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out / "gpu-logs.tgz", "w:gz") as tar:
            tar.add(args.work / "logs", arcname="logs")
            for metrics in sorted((args.work / "runs").glob("*/metrics.jsonl")):
                tar.add(metrics, arcname=str(metrics.relative_to(args.work)))
        (args.out / "gpu-summary.txt").write_text("\n".join(printed) + "\n")


if __name__ == "__main__":
    main()
