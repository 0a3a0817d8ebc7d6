"""The benchmark ratios against TRL as one PNG: for each pair, the newest line of benchmarks/results.jsonl (what
benchmarks/run.py appends on a CPU), as two bars: throughput, ours / TRL, and peak memory, TRL / ours (both > 1 where
ours is ahead). Runs on TRL's exact batches (run.py --ungrouped) are left out unless --ungrouped; GPU lines
(benchmarks/gpu.py's, which name their `device`) are left out.

    python benchmarks/run.py && python benchmarks/figure.py      # measure, then draw
    python benchmarks/figure.py --out benchmarks/figures/ratios_vs_trl.png

matplotlib is an optional dependency (`pip install matplotlib`), imported only to draw.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["sft", "reward_model", "dpo", "online_dpo", "kto", "grpo", "rloo"]  # the README's order


def newest(results: Path, ungrouped: bool) -> list[dict]:
    """The newest line of each pair (file order is time order), in ORDER."""
    latest = {}
    for number, text in enumerate(open(results), start=1):
        line = json.loads(text)
        if "device" in line:  # a GPU measurement (benchmarks/gpu.py)
            continue
        missing = {"pair", "date", "ratio", "ours_peak_mib", "trl_peak_mib"} - set(line)
        if missing:
            raise SystemExit(f"{results}:{number}: missing {sorted(missing)}")
        if line.get("ungrouped", False) == ungrouped:
            latest[line["pair"]] = line
    return sorted(latest.values(), key=lambda line: ORDER.index(line["pair"]) if line["pair"] in ORDER else 99)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "figures" / "ratios_vs_trl.png")
    parser.add_argument("--ungrouped", action="store_true", help="the runs on TRL's exact batches instead")
    args = parser.parse_args()
    lines = newest(args.results, args.ungrouped)
    if not lines:
        raise SystemExit(f"{args.results}: no measurements to draw")
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: drawing needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [line["ratio"] for line in lines]
    memory = [line["trl_peak_mib"] / line["ours_peak_mib"] for line in lines]
    labels = [f"{line['pair']}\n{line['date']}" for line in lines]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    positions = range(len(lines))
    width = 0.38
    bars = ax.bar([p - width / 2 for p in positions], speed, width, label="throughput, ours / TRL")
    bars_memory = ax.bar([p + width / 2 for p in positions], memory, width, label="peak RSS, TRL / ours")
    for group in (bars, bars_memory):
        for bar in group:
            ax.annotate(
                f"{bar.get_height():.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="gray", linewidth=0.8, linestyle="--", label="2x")
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_ylabel("ratio (> 1: ours ahead)")
    ax.set_title("Against TRL on the same CPU workload (benchmarks/README.md)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: " + ", ".join(f"{line['pair']} {line['ratio']:.2f}" for line in lines))


if __name__ == "__main__":
    main()
