"""The benchmarks' command lines of our scripts parse: every flag benchmarks/run.py and benchmarks/gpu.py give a
script is one of its flags (a renamed or removed flag would only show when a benchmark runs)."""

import importlib
import sys
from pathlib import Path

import pytest
import tyro

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402

import run  # noqa: E402


def parse(command: list[str]):
    """The script's Args from the command line [python, script.py, flags...]."""
    module = importlib.import_module(Path(command[1]).stem)
    return tyro.cli(module.Args, args=command[2:])


@pytest.mark.parametrize("pair", run.PAIRS)
def test_cpu_benchmark_commands_parse(pair):
    args = parse(run.commands(pair, Path("/work"), 4, Path("/out"), 1e-4)["ours"])
    assert args.max_steps == 4 and args.learning_rate == 1e-4


@pytest.mark.parametrize("pair", gpu.PAIRS)
def test_gpu_benchmark_commands_parse(pair):
    args = parse(gpu.our_command(pair, Path("/work"), small=False))
    assert args.dtype == "bf16" and args.log_every == 1
