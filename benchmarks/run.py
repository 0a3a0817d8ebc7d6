"""Side-by-side throughput of our scripts and TRL's trainers on one fixed CPU workload (benchmarks/workload.py).

For each pair (sft.py / SFTTrainer, reward_model.py / RewardTrainer, dpo_pairwise.py / DPOTrainer,
dpo_pairwise.py --online / OnlineDPOTrainer, kto_pointwise.py / KTOTrainer, rl_ppo.py --estimator grpo /
GRPOTrainer, rl_ppo.py --estimator rloo / RLOOTrainer), ours and TRL run alternately as subprocesses (ours, TRL,
ours, TRL, ... for --repeats) on the same model folder, data and settings, with the same torch thread count.
Start-up (imports, model load, tokenization, the final save) is left out by differencing: each side runs for N1
and for N2 optimizer steps (rollouts for the RL pairs), and

    examples/s = (N2 - N1) * examples per step / (wall time of the N2 run - wall time of the N1 run)

(pairs/s for the reward model and both DPOs, responses/s for the RL pairs). The same with CPU time (user + sys)
in place of wall time gives examples per CPU-second: close to examples/s when nothing else runs, and less
disturbed than it when something does. Times and peak RSS come from GNU time (/usr/bin/time), not from waiting on
the child here: a process inherits its parent's peak RSS at exec, and this one has imported torch. Peak RSS is the
largest of a side's runs. The online pairs also print each side's generation: tokens sampled per second of
sampling (ours from its metrics.jsonl, TRL's from the clock trl_side.py puts around the method that samples), mean
response length, EOS rate, and for ours the fraction kept (online DPO drops ties). rl_ppo.py's pairs also print
where ours' last step of the N2 run went (its time/* metrics). online_kto and ppo have no TRL counterpart (TRL
removed its PPOTrainer): ours only, with its seconds a step.

    python benchmarks/run.py                                # every pair whose script exists, 2 repeats
    python benchmarks/run.py --pairs sft --repeats 3 --threads 2
    python benchmarks/run.py --ungrouped                    # ours on TRL's batches (no length grouping)
    python benchmarks/run.py --pairs grpo rloo ppo          # the RL pairs

Each pair with a TRL side appends its result to benchmarks/results.jsonl; `python benchmarks/figure.py` draws the
newest of each.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import workload

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.jsonl"  # every measured pair appends a line (benchmarks/figure.py)
B, K = workload.BATCH_SIZE, workload.NUM_SAMPLES
# name -> (our script, data file in the work folder, unit, default N1 and N2, per_device_batch_size, units a step)
PAIRS = {
    "sft": ("sft.py", "sft.jsonl", "examples", (4, 36), B, B),
    "reward_model": ("reward_model.py", "pairwise.jsonl", "pairs", (4, 36), B, B),
    "dpo": ("dpo_pairwise.py", "pairwise.jsonl", "pairs", (4, 36), B, B),
    "online_dpo": ("dpo_pairwise.py", "pairwise.jsonl", "pairs", (2, 10), B, B),  # prompts only; ~3 s a step
    "kto": ("kto_pointwise.py", "pointwise.jsonl", "examples", (4, 36), B, B),
    "online_kto": ("kto_pointwise.py", "pairwise.jsonl", "examples", (2, 10), B, B),  # prompts only; no TRL
    # prompts only; a step: B / 2 prompts x K samples, one rollout = one minibatch = one optimizer step, both sides
    "grpo": ("rl_ppo.py", "pairwise.jsonl", "responses", (2, 10), B // 2 * K, B // 2 * K),
    "rloo": ("rl_ppo.py", "pairwise.jsonl", "responses", (2, 10), B // 2 * K, B // 2 * K),
    # ours only (TRL has no PPOTrainer): rl_ppo.py's PPO defaults, rollouts of 2 minibatches of B, 4 epochs
    "ppo": ("rl_ppo.py", "pairwise.jsonl", "responses", (2, 10), B, 2 * B),
}
NO_TRL = ("online_kto", "ppo")
RL = ("grpo", "rloo", "ppo")


def commands(
    pair: str, work: Path, steps: int, output_dir: Path, learning_rate: float, ungrouped: bool = False
) -> dict[str, list[str]]:
    """The two command lines of a pair, on the same files and settings (the flags are our scripts' names).
    ungrouped: ours without length grouping, so both sides train on the same batches in the same order."""
    script, data, _, _, batch_size, _ = PAIRS[pair]
    shared = [
        "--model_name_or_path",
        str(work),
        "--dataset",
        str(work / data),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(steps),
        "--seed",
        "1",
        "--per_device_batch_size",
        str(batch_size),
        "--learning_rate",
        str(learning_rate),
        "--warmup_steps",
        "20",
    ]
    if pair not in RL:  # rl_ppo.py has none: its samples' length is --generation.max_new_tokens
        shared += ["--max_length", str(workload.MAX_LENGTH)]
    if pair in ("dpo", "online_dpo", "kto", "online_kto"):
        shared += ["--beta", "0.1"]
    if pair in ("online_dpo", "online_kto", *RL):
        shared += [
            "--annotator",
            f"reward_model:{work / 'rm'}",
            "--generation.max_new_tokens",
            str(workload.MAX_NEW_TOKENS),
            "--generation.temperature",
            str(workload.TEMPERATURE),
        ]
    if pair in ("grpo", "rloo"):  # one rollout, one pass, one optimizer step a step (TRL: num_iterations 1,
        # steps_per_generation 1); the KL weight is TRL's beta
        shared += [
            "--num_samples",
            str(workload.NUM_SAMPLES),
            "--kl_coef",
            str(workload.KL_COEF),
            "--num_ppo_epochs",
            "1",
            "--num_minibatches",
            "1",
        ]
    # ours only: the estimator; no score for a response without EOS in the group pairs (TRL has no such penalty)
    rl = {"grpo": ["--estimator", "grpo", "--missing_eos_penalty", "None"], "ppo": ["--estimator", "gae"]}
    rl["rloo"] = ["--estimator", "rloo", "--missing_eos_penalty", "None"]
    return {
        "ours": [
            sys.executable,
            script,
            *shared,
            *(["--online"] if pair.startswith("online") else []),
            *rl.get(pair, []),
            "--max_prompt_length",
            str(workload.MAX_PROMPT_LENGTH),
            "--log_every",
            "1000000",
            "--eval_every",
            "1000000",
            *(["--no-group-by-length"] if ungrouped else []),
        ],
        "TRL": [sys.executable, "benchmarks/trl_side.py", pair, *shared],
    }


def generation_stats(output_dir: Path) -> dict:
    """Sampling of an online run: ours from its metrics.jsonl (logged once, at the end: the last step's sampling),
    TRL's from the totals trl_side.py writes (the whole run). Empty for offline pairs. rl_ppo.py's time/* metrics
    (seconds of the last step by phase) come along."""
    if (output_dir / "generation.json").exists():
        t = json.loads((output_dir / "generation.json").read_text())
        return {
            "generated_tokens_per_s": t["generated_tokens"] / t["generation_seconds"],
            "response_length": t["generated_tokens"] / t["responses"],
            "eos_rate": t["eos"] / t["responses"],
            "longest": t["longest"],
        }
    metrics = {}
    if (output_dir / "metrics.jsonl").exists():
        for line in open(output_dir / "metrics.jsonl"):
            metrics |= json.loads(line)
    if "online/generated_tokens_per_s" not in metrics:
        return {}
    return {
        k.removeprefix("online/"): metrics[k]
        for k in ("online/generated_tokens_per_s", "online/response_length", "online/eos_rate", "online/kept_fraction")
    } | {k: v for k, v in metrics.items() if k.startswith("time/")}


def timed(command: list[str], output_dir: Path, env: dict) -> tuple[float, float, float, dict]:
    """(wall seconds, CPU seconds, peak RSS in MiB, generation stats) of one subprocess; its output goes to
    <output_dir>.log."""
    shutil.rmtree(output_dir, ignore_errors=True)
    log, stats = output_dir.with_suffix(".log"), output_dir.with_suffix(".time")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        env, HF_DATASETS_CACHE=str(output_dir / "datasets_cache")
    )  # a fresh cache: every run does the same start-up
    with open(log, "w") as f:
        process = subprocess.run(
            ["/usr/bin/time", "-o", str(stats), "-f", "%e %U %S %M", *command],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if process.returncode:
        raise SystemExit(f"failed with exit code {process.returncode}: {' '.join(command)}\n  see {log}")
    generation = generation_stats(output_dir)
    shutil.rmtree(output_dir)
    wall, user, system, peak_kib = map(float, stats.read_text().split())
    return wall, user + system, peak_kib / 1024, generation


def run_once(args, env: dict, pair: str, side: str, steps: int, repeat: int) -> tuple[float, float, float, dict]:
    output_dir = args.work / "runs" / f"{pair}-{side}-{steps}steps-{repeat}"
    return timed(
        commands(pair, args.work, steps, output_dir, args.learning_rate, args.ungrouped)[side], output_dir, env
    )


def record(pair: str, args, **measured):
    """One line of benchmarks/results.jsonl, what benchmarks/figure.py draws: the pair's measurement, when and where."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(  # edits to the code, not to this file of results
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results.jsonl"],
        cwd=ROOT,
        capture_output=True,
    )
    line = {
        "pair": pair,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip() + ("+edits" if dirty.stdout.strip() else ""),
        "machine": f"{os.cpu_count()} CPUs, {args.threads} thread(s) per side",
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "repeats": args.repeats,
        "ungrouped": args.ungrouped,
    } | {k: round(v, 4) if isinstance(v, float) else v for k, v in measured.items()}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS), help="which pairs to run")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each side, alternating ours and TRL")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=None,
        metavar=("N1", "N2"),
        help="the two step counts to difference (default: 4 36; 2 10 for the online and RL pairs)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides (OMP_NUM_THREADS)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate of both sides")
    parser.add_argument(
        "--ungrouped",
        action="store_true",
        help="ours without length grouping: the same batches as TRL's, in the same order (equal padding)",
    )
    parser.add_argument("--work", type=Path, default=workload.WORK, help="workload folder (built there if missing)")
    args = parser.parse_args()

    if not (args.work / "pairwise.jsonl").exists():
        workload.build(args.work)
    if not (args.work / "rm" / "model.safetensors").exists():  # a workload built before online_dpo
        workload.build_reward_model(args.work)
    if not (args.work / "pointwise.jsonl").exists():  # a workload built before kto
        workload.build_pointwise(args.work)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-c", "import trl.trainer"], env=env, check=True
    )  # warm the file cache for the first run
    print(
        f"torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')}; "
        f"{args.threads} thread(s); "
        f"load average {os.getloadavg()[0]:.2f} (should be ~0: other processes distort the timings)",
        flush=True,
    )
    rows = []
    for pair in args.pairs:
        script, _, unit, default_steps, _, per_step = PAIRS[pair]
        n1, n2 = args.steps or default_steps
        if not (ROOT / script).exists():
            print(f"{pair}: skipped: {script} not present yet")
            continue
        rates, cpu_rates, peaks, generated, step_times = ({"ours": [], "TRL": []} for _ in range(5))
        sides = ("ours",) if pair in NO_TRL else ("ours", "TRL")  # TRL has no online KTO, no PPO
        for repeat in range(args.repeats):
            for side in sides:
                (wall1, cpu1, peak1, _), (wall2, cpu2, peak2, generation) = (
                    run_once(args, env, pair, side, steps, repeat) for steps in (n1, n2)
                )
                rates[side].append((n2 - n1) * per_step / (wall2 - wall1))
                cpu_rates[side].append((n2 - n1) * per_step / (cpu2 - cpu1))
                peaks[side].append(max(peak1, peak2))
                print(
                    f"{pair} repeat {repeat + 1} {side:>4}: {wall1:6.1f} s for {n1} steps, "
                    f"{wall2:6.1f} s for {n2} steps "
                    f"-> {rates[side][-1]:6.2f} {unit}/s ({cpu_rates[side][-1]:6.2f} per CPU-second), "
                    f"peak RSS {peaks[side][-1]:.0f} MiB",
                    flush=True,
                )
                times = {k.removeprefix("time/"): generation.pop(k) for k in list(generation) if k.startswith("time/")}
                if generation:  # the N2 run's: ours' last step, TRL's over all its steps
                    generated[side].append(generation["generated_tokens_per_s"])
                    print(
                        f"    generation ({n2} steps): " + ", ".join(f"{k} {v:.3f}" for k, v in generation.items()),
                        flush=True,
                    )
                if times:  # rl_ppo.py: the last step of the N2 run by phase
                    step_times[side].append(times)
                    print(
                        f"    seconds of step {n2} (time/*): "
                        + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
                        + f"; their sum {sum(times.values()):.3f}",
                        flush=True,
                    )
        if step_times["ours"]:
            mean_times = {
                k: sum(t[k] for t in step_times["ours"]) / len(step_times["ours"]) for k in step_times["ours"][0]
            }
            print(
                f"{pair} ours, seconds of the last step by phase (mean of the N2 runs): "
                + ", ".join(f"{k} {v:.2f}" for k, v in mean_times.items())
                + f"; their sum {sum(mean_times.values()):.2f}",
                flush=True,
            )
        if len(sides) == 1:
            ours = sum(rates["ours"]) / len(rates["ours"])
            print(f"{pair}: ours {ours:.2f} {unit}/s, {per_step / ours:.2f} s a step (no TRL counterpart)")
            continue
        (ours, theirs), (ours_cpu, theirs_cpu) = (
            [sum(r[s]) / len(r[s]) for s in ("ours", "TRL")] for r in (rates, cpu_rates)
        )
        record(
            pair,
            args,
            unit=unit,
            ours=ours,
            trl=theirs,
            ratio=ours / theirs,
            cpu_ratio=ours_cpu / theirs_cpu,
            ours_peak_mib=max(peaks["ours"]),
            trl_peak_mib=max(peaks["TRL"]),
        )
        rows.append(
            f"| {pair} | {ours:.2f} {unit}/s | {theirs:.2f} {unit}/s | {ours / theirs:.2f} | "
            f"{ours_cpu / theirs_cpu:.2f} | "
            f"{max(peaks['ours']):.0f} MiB | {max(peaks['TRL']):.0f} MiB |"
        )
        if generated["ours"]:
            ours_generated, theirs_generated = (sum(generated[s]) / len(generated[s]) for s in ("ours", "TRL"))
            print(
                f"{pair} generated tokens/s (mean of the N2 runs): ours {ours_generated:.0f}, "
                f"TRL {theirs_generated:.0f}, "
                f"ours/TRL {ours_generated / theirs_generated:.2f}",
                flush=True,
            )
    if rows:  # none when only pairs without TRL ran
        print(
            "\n| pair | ours | TRL | ours/TRL | ours/TRL by CPU time | ours peak RSS | TRL peak RSS |"
            "\n|---|---|---|---|---|---|---|"
        )
        print("\n".join(rows))


if __name__ == "__main__":
    main()
