"""What a run logs: metrics.jsonl (one JSON object per logged step), args.json, tables, wandb under --track, the
progress bar; and `Means`, a step's diagnostics averaged over every process. Only rank 0 writes; on --resume, the
lines after the checkpoint's step are dropped."""

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict

import torch
from tqdm import tqdm

from common.distributed import is_main, sum_over_processes


def kept_lines(path: str, resume_step: int | None) -> list[str]:
    """The lines of a log of {"step", ...} objects that a run resumed at resume_step keeps (none for a new run)."""
    if resume_step is None or not os.path.exists(path):
        return []
    return [line for line in open(path) if json.loads(line)["step"] <= resume_step]


class Means:
    """A step's diagnostics, each declared once where it is computed together with what it is averaged over:
    `add(name, values, mask)` adds the values where mask (bool or 0/1, values' shape; None: all of them) to name's sum
    and their count to its denominator; `result()` is every name's sum over its count, over every process (one
    collective). So a new diagnostic is one `add` line, and the examples added only to fill a batch are left out of
    every one of them by their mask (the batch's `trainable`)."""

    def __init__(self):
        self.sums, self.counts = defaultdict(float), defaultdict(float)

    def add(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None):
        values = values.detach().double()
        mask = torch.ones_like(values) if mask is None else mask.detach().double()
        self.sums[name] += (values * mask).sum()
        self.counts[name] += mask.sum()

    def result(self) -> dict[str, float]:
        totals = sum_over_processes(
            {f"sum {k}": v for k, v in self.sums.items()} | {f"count {k}": v for k, v in self.counts.items()}
        )
        return {name: totals[f"sum {name}"] / totals[f"count {name}"] for name in self.sums if totals[f"count {name}"]}


class Tracker:
    """metrics.jsonl (one JSON object per logged step: `step`, `time` and the metrics) and args.json (the flags, and
    the values derived from them) in output_dir, tables (log_table) in wandb under --track, else in
    output_dir/NAME.jsonl. Only rank 0 writes. On --resume, the lines of these logs after the checkpoint's step are
    dropped, and wandb continues the run of the same id."""

    LOGS = ("metrics.jsonl", "eval_samples.jsonl", "online_samples.jsonl")
    SHOWN = {
        "train/loss": ("loss", "{:.4g}"),
        "train/tokens_per_s": ("tokens/s", "{:.0f}"),
        "eval/reward": ("eval/reward", "{:.3f}"),
        "eval/win_rate": ("win rate", "{:.3f}"),
    }

    def __init__(self, args, run_id: str, derived: dict, resume_step: int | None = None):
        self.enabled, self.bar, self.shown = is_main(), None, {}
        if not self.enabled:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        config = asdict(args) | {"derived": derived}
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(config, f, indent=2)
        self.path, self.output_dir = os.path.join(args.output_dir, "metrics.jsonl"), args.output_dir
        kept = {name: kept_lines(os.path.join(args.output_dir, name), resume_step) for name in self.LOGS}
        for name, lines in kept.items():  # a log this run writes to starts with the lines it keeps, or empty
            if lines or os.path.exists(os.path.join(args.output_dir, name)):
                with open(os.path.join(args.output_dir, name), "w") as f:
                    f.writelines(lines)
        # `time`: wall seconds of training so far (from here, after loading), a resumed run's earlier part included
        self.start = time.time() - (
            json.loads(kept["metrics.jsonl"][-1]).get("time", 0.0) if kept["metrics.jsonl"] else 0.0
        )
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb
            run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                config=config,
                name=run_name,
                id=run_id,
                resume="allow",
            )

    def progress(self, steps: range, total: int):
        """The steps as a progress bar (rank 0's) that shows the latest loss, tokens/s and eval/reward."""
        self.bar = tqdm(steps, initial=steps.start, total=total, disable=not self.enabled)
        return self.bar

    def log(self, step: int, metrics: dict):
        """One line of metrics.jsonl for the step (with the wall time), and a printed line of its eval/* metrics."""
        if not self.enabled:
            return
        evaluated = {name: value for name, value in metrics.items() if name.startswith("eval/") and "per_s" not in name}
        if evaluated and step > 0:
            print(f"step {step}: " + ", ".join(f"{k} {float(v):.3f}" for k, v in evaluated.items()), flush=True)
        metrics = {k: float(v) for k, v in metrics.items()} | {"time": time.time() - self.start}
        if torch.cuda.is_available():  # the peak since the run started: benchmarks/gpu.py compares it with TRL's
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.shown |= {
            short: form.format(metrics[name]) for name, (short, form) in self.SHOWN.items() if name in metrics
        }
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_table(self, step: int, name: str, rows: list[dict]):
        """Rows of the same keys: a wandb.Table under --track, else lines {"step", **row} of output_dir/NAME.jsonl."""
        if not self.enabled or not rows:
            return
        if self.wandb is not None:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({name: table}, step=step)
        else:
            with open(os.path.join(self.output_dir, f"{name}.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)

    def finish(self):
        if self.enabled and self.wandb is not None:
            self.wandb.finish()
