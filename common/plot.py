"""Learning curves from runs' metrics.jsonl, as a PNG: one subplot per metric, one line per run.

    python -m common.plot runs/dpo runs/online-dpo --metrics eval/reward train/loss --out curves.png
    python -m common.plot runs/a runs/b --metrics rewards/margins --labels offline online --title "toy DPO"

Each RUN_DIR is a run's --output_dir: metrics.jsonl holds one JSON object per logged step, each with
"step" and "time" (wall seconds of training so far; eval/* only on eval steps). The x axis is the step, or
the time with `--x time` (a run logged before the scripts wrote "time" fails in one line). A run that does not
log a metric is left out of that subplot, with a printed note. Legend labels are --labels, else the run folders' names
(their args.json exp_name when the folder names collide, the paths as given when those collide too).

matplotlib is an optional dependency (`pip install matplotlib`), imported only to draw.
"""

import argparse
import json
import math
import os
from pathlib import Path

from common.flags import fail


def read_metrics(run_dir: str) -> list[dict]:
    """The lines of RUN_DIR/metrics.jsonl, one dict per logged step, in file order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"{path}: no such file (is {run_dir} a run's --output_dir?)")
    lines = []
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{path}:{number}: not valid JSON ({e.msg})")
            if not isinstance(line, dict) or "step" not in line:
                fail(f"{path}:{number}: expected a JSON object with a 'step' key")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in line.values()):
                fail(f"{path}:{number}: every value should be a number")
            lines.append(line)
    return lines


def series(lines: list[dict], metric: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys): the x value and METRIC of each line that logs METRIC, in file order."""
    points = [(line[x], line[metric]) for line in lines if metric in line]
    return [p[0] for p in points], [p[1] for p in points]


def run_labels(run_dirs: list[str]) -> list[str]:
    """The run folders' names; their exp_name if those collide; the paths as given if those collide too."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    exp_names = []
    for d, name in zip(run_dirs, names, strict=True):
        args_path = os.path.join(d, "args.json")
        exp_names.append(
            json.loads(Path(args_path).read_text()).get("exp_name", name) if os.path.isfile(args_path) else name
        )
    return exp_names if len(set(exp_names)) == len(exp_names) else list(run_dirs)


def plot(run_dirs, metrics, out, labels=None, x="step", title=None, dpi=120):
    """Draw METRICS (one subplot each) of the runs in RUN_DIRS (one line each) into the PNG OUT."""
    if labels is not None and len(labels) != len(run_dirs):
        fail(f"--labels: got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_metrics(d) for d in run_dirs]
    labels = labels or run_labels(run_dirs)
    known = sorted({key for lines in runs for line in lines for key in line} - {"step", "time"})
    for metric in metrics:
        if not any(metric in line for lines in runs for line in lines):
            fail(f"no run logs '{metric}'; the runs log: {', '.join(known) or 'nothing but steps'}")
    for d, lines in zip(run_dirs, runs, strict=True):
        if any(x not in line for line in lines):
            fail(f"--x {x}: {os.path.join(d, 'metrics.jsonl')} has lines without a '{x}' key (use --x step)")

    try:
        import matplotlib
    except ImportError:
        fail("plotting needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    columns = min(len(metrics), 2 if len(metrics) <= 4 else 3)
    rows = math.ceil(len(metrics) / columns)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
        legend = {}  # label -> line, one legend entry per run for the whole figure
        for ax, metric in zip(axes.flat, metrics, strict=False):
            skipped = []
            for i, (lines, label) in enumerate(zip(runs, labels, strict=True)):
                xs, ys = series(lines, metric, x)
                if not xs:
                    skipped.append(label)
                    continue
                # a run keeps its colour in every subplot; markers show where sparse (eval) points are
                (line,) = ax.plot(xs, ys, color=f"C{i}", marker="o" if len(xs) <= 30 else None, markersize=3)
                legend.setdefault(label, line)
            if skipped:
                print(f"note: {metric}: skipped {len(skipped)} run(s) that do not log it: {', '.join(skipped)}")
            ax.set(title=metric, xlabel="wall time (s)" if x == "time" else "step", ylabel=metric)
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(metrics) :]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title, fontsize=14)
        fig.tight_layout()
        # below the subplots, where it hides no curve (bbox_inches="tight" grows the PNG to hold it)
        legend = {label: legend[label] for label in labels if label in legend}  # in the order of the runs
        fig.legend(
            legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(legend), 4)
        )
        fig.savefig(out, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description="Learning curves from runs' metrics.jsonl, as a PNG.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's --output_dir (holds metrics.jsonl)")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics to draw, one subplot each")
    parser.add_argument("--out", default="curves.png", help="the PNG file to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the run folders' names)")
    parser.add_argument("--x", choices=["step", "time"], default="step", help="x axis: step, or the runs' 'time' key")
    parser.add_argument("--title", help="title over the whole figure")
    parser.add_argument("--dpi", type=int, default=120, help="resolution of the PNG")
    plot(**vars(parser.parse_args()))


if __name__ == "__main__":
    main()
