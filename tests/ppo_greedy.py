"""rl_ppo.py with greedy sampling: every process then samples what one process would for the same prompts, so a run
on 1 process and on 2 see the same rollouts (tests/test_ppo.py: 1 process == 2). Same command line as rl_ppo.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tyro  # noqa: E402

import common.online  # noqa: E402
import rl_ppo  # noqa: E402
from common.generation import generate  # noqa: E402

common.online.generate = lambda *args, **kwargs: generate(*args, **{**kwargs, "temperature": 0.0})
rl_ppo.main(tyro.cli(rl_ppo.Args))
