"""Does reweighting against the distribution shift help? Offline DPO and offline KTO on the toy task, from the SFT
model, with --reweighter none / policy (WPO) / importance:SFT (pi / rho, the SFT model standing in for rho), on
the toy data (written by the rho the SFT model was fitted to) and on toy_shifted (written by a noisier rho), over
seeds. Prints each cell's final eval/reward as mean and spread (min..max) over the seeds.

    python sft.py --output_dir runs/sft                       # the starting point (~1 min)
    python benchmarks/reweighting.py --sft runs/sft --jobs 2  # 36 runs, one thread each (~20 min on 2 cores)

Each run is the script with its own defaults plus --model_name_or_path, --dataset, --reweighter and --seed; KTO on
toy_shifted, whose examples are 19% desirable, also gets --desirable_weight 4 (the KTO paper's advice: lambda_D n_D
/ (lambda_U n_U) in [1, 4/3]). Runs go to runs/reweighting/<method>-<dataset>-<kind>-<seed>; a finished run is
read again, not rerun.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"dpo": "dpo_pairwise.py", "kto": "kto_pointwise.py"}


def final_reward(output_dir: Path) -> float | None:
    path = output_dir / "metrics.jsonl"
    if not (output_dir / "model.safetensors").exists() or not path.exists():
        return None
    rewards = [m["eval/reward"] for m in map(json.loads, path.read_text().splitlines()) if "eval/reward" in m]
    return rewards[-1]


def run(method: str, dataset: str, kind: str, seed: int, sft: str, out: Path) -> float:
    output_dir = out / f"{method}-{dataset}-{kind.split(':')[0]}-{seed}"
    if final_reward(output_dir) is None:
        flags = ["--model_name_or_path", sft, "--dataset", dataset, "--seed", str(seed), "--reweighter", kind]
        if method == "kto" and dataset == "toy_shifted":
            flags += ["--desirable_weight", "4"]
        command = [sys.executable, SCRIPTS[method], *flags, "--output_dir", str(output_dir), "--overwrite"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return final_reward(output_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="runs/sft", help="the SFT model (also the stand-in rho of importance)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["dpo", "kto"], choices=sorted(SCRIPTS))
    parser.add_argument("--datasets", nargs="+", default=["toy", "toy_shifted"])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--out", default="runs/reweighting")
    args = parser.parse_args()
    kinds = ["none", "policy", f"importance:{args.sft}"]
    cells = [(m, d, k) for m in args.methods for d in args.datasets for k in kinds]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (cell, seed): pool.submit(run, *cell, seed, args.sft, REPO / args.out)
            for cell in cells
            for seed in args.seeds
        }
    print(f"final eval/reward over seeds {args.seeds} (mean, min..max); the SFT model: {args.sft}")
    print("| method | data | reweighter | eval/reward | min..max |\n|---|---|---|---|---|")
    for method, dataset, kind in cells:
        rewards = [futures[((method, dataset, kind), seed)].result() for seed in args.seeds]
        print(
            f"| {method} | {dataset} | {kind.split(':')[0]} | {statistics.mean(rewards):.3f} | "
            f"{min(rewards):.3f}..{max(rewards):.3f} |"
        )


if __name__ == "__main__":
    main()
