"""A script whose loss is NaN in some backward passes, for the tests of the non-finite guard (tests/test_nonfinite.py):
    python tests/nonfinite.py FIRST LAST SCRIPT.py [SCRIPT's flags]
runs SCRIPT with the loss of its backward calls FIRST..LAST (counted from 1) multiplied by NaN, so those gradients
are NaN."""

import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
first, last, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls, backward = 0, torch.Tensor.backward


def nan_backward(loss, *args, **kwargs):
    global calls
    calls += 1
    return backward(loss * float("nan") if first <= calls <= last else loss, *args, **kwargs)


torch.Tensor.backward = nan_backward
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(str(REPO / script), run_name="__main__")
