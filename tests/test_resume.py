"""Every mode resumes exactly (kill after a checkpoint, resume: bit-identical weights); a run owns its output_dir."""

import pytest

from conftest import assert_resume_is_exact, read_metrics, run_script

QUICK = ["--log_every", "2", "--eval_every", "4", "--warmup_steps", "2", "--save_every", "3"]


@pytest.mark.parametrize(
    "script, extra",
    [
        ("reward_model.py", ["--max_steps", "12", "--num_eval_examples", "32"]),
        ("dpo_pairwise.py", ["--max_steps", "12", "--num_eval_examples", "32", "--eval.num_prompts", "32"]),
    ],
)
def test_offline_resume_is_exact(tmp_path, script, extra):
    assert_resume_is_exact(tmp_path, script, *QUICK, *extra, checkpoint=3)


def test_online_resume_is_exact(sft_model, tmp_path):
    """Online, the data a step sees depends on the prompt stream, the sampling generator and the rate of kept pairs so
    far: all of it is in the checkpoint, so a resumed run samples and trains exactly as an uninterrupted one."""
    assert_resume_is_exact(
        tmp_path,
        "dpo_pairwise.py",
        "--eval.num_prompts",
        "32",
        "--online",
        "--model_name_or_path",
        str(sft_model),
        *QUICK,
        "--max_steps",
        "12",
        "--per_device_batch_size",
        "8",
        checkpoint=3,
    )


def test_a_run_owns_its_output_dir(tmp_path):
    """A second run (another seed, no --resume) into a folder with the first run's checkpoints stops in one line before
    any work; with --overwrite it deletes them and keeps all of its own; --resume then continues the second run."""
    args = [
        "sft.py",
        "--max_steps",
        "6",
        "--save_every",
        "2",
        "--log_every",
        "1",
        "--eval_every",
        "100",
        "--eval.num_prompts",
        "16",
        "--output_dir",
        str(tmp_path),
    ]
    run_script(*args)
    again = run_script(*args, "--seed", "2", check=False)
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode != 0 and "Traceback" not in again.stderr and "holds the checkpoints of run" in last
    assert "--overwrite" in last and "--resume" in last
    run_script(*args, "--seed", "2", "--overwrite", "--save_every", "1")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    resumed = run_script(*args, "--seed", "2", "--max_steps", "6", "--resume")
    assert "resuming run" in resumed.stdout and "(step 6)" in resumed.stdout
    assert read_metrics(tmp_path)[-1]["step"] == 6


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_script("dpo_pairwise.py", "--output_dir", str(tmp_path / "file"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not a directory" in proc.stderr.strip().splitlines()[-1] and "reference log-probs" not in proc.stdout
