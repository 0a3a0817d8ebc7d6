"""common/plot.py: reading metrics.jsonl, picking a metric's points, drawing a PNG, one-line errors."""

import json
import sys

import pytest

from common.plot import plot, read_metrics, run_labels, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, lines, exp_name="dpo"):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "args.json").write_text(json.dumps({"exp_name": exp_name, "seed": 1}))
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    """Two runs logging train/loss every step and eval/reward every other step; a third with no eval."""
    offline = write_run(
        tmp_path / "offline",
        [
            {"step": 1, "train/loss": 0.69},
            {"step": 2, "train/loss": 0.60, "eval/reward": 0.78},
            {"step": 3, "train/loss": 0.55},
            {"step": 4, "train/loss": 0.50, "eval/reward": 0.81},
        ],
    )
    online = write_run(
        tmp_path / "online",
        [
            {"step": s, "train/loss": 0.7 - 0.05 * s, **({"eval/reward": 0.78 + 0.03 * s} if s % 2 == 0 else {})}
            for s in range(1, 7)
        ],
    )
    no_eval = write_run(tmp_path / "no_eval", [{"step": 1, "train/loss": 0.7}, {"step": 2, "train/loss": 0.65}])
    return [offline, online, no_eval]


def test_series_picks_exactly_the_logged_points(runs):
    lines = read_metrics(runs[0])
    assert len(lines) == 4
    assert series(lines, "eval/reward") == ([2, 4], [0.78, 0.81])
    assert series(lines, "train/loss") == ([1, 2, 3, 4], [0.69, 0.60, 0.55, 0.50])
    assert series(read_metrics(runs[2]), "eval/reward") == ([], [])


def test_labels_are_folder_names_then_exp_name_then_paths(tmp_path):
    a = write_run(tmp_path / "seed1" / "run", [{"step": 1}], exp_name="dpo")
    b = write_run(tmp_path / "seed2" / "run", [{"step": 1}], exp_name="online-dpo")
    c = write_run(tmp_path / "seed3" / "run", [{"step": 1}], exp_name="dpo")
    assert run_labels([str(tmp_path / "seed1"), str(tmp_path / "seed2")]) == ["seed1", "seed2"]
    assert run_labels([a, b]) == ["dpo", "online-dpo"]
    assert run_labels([a, c]) == [a, c]


def test_plot_writes_a_png(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    plot(runs, ["eval/reward", "train/loss"], str(out), title="toy")
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert "note: eval/reward: skipped 1 run(s) that do not log it: no_eval" in capsys.readouterr().out


def test_plot_with_time_axis_and_many_subplots(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "timed", [{"step": s, "time": 1.5 * s, "a": s, "b": -s, "c": s * s} for s in range(5)])
    out = tmp_path / "grid.png"
    plot([run], ["a", "b", "c"], str(out), labels=["timed"], x="time", dpi=50)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_missing_metrics_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/metrics\.jsonl: no such file"):
        read_metrics(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"step": 3, "train/loss": 0.5', "not valid JSON"),
        ('{"train/loss": 0.5}', "'step' key"),
        ('{"step": 3, "x": "a"}', "number"),
    ],
)
def test_malformed_line_names_file_and_line_number(tmp_path, bad_line, message):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.7}\n\n' + bad_line + "\n")
    with pytest.raises(SystemExit) as error:
        read_metrics(str(tmp_path))
    assert str(error.value).startswith(f"error: {tmp_path / 'metrics.jsonl'}:3: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_metric_lists_the_known_ones(runs, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no run logs 'eval/rewrd'; the runs log: eval/reward, train/loss$"):
        plot(runs, ["train/loss", "eval/rewrd"], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_time_axis_without_time_key_and_wrong_label_count_fail(runs, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --x time: .*offline/metrics\.jsonl has lines without a 'time' key"):
        plot(runs, ["train/loss"], str(tmp_path / "x.png"), x="time")
    with pytest.raises(SystemExit, match=r"^error: --labels: got 1 labels for 3 runs$"):
        plot(runs, ["train/loss"], str(tmp_path / "x.png"), labels=["one"])


def test_missing_matplotlib_is_a_one_line_error(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match=r"^error: plotting needs matplotlib: pip install matplotlib$"):
        plot(runs, ["train/loss"], str(tmp_path / "x.png"))


def test_benchmark_figure_draws_the_newest_result_of_each_pair(tmp_path):
    """benchmarks/figure.py: the newest line of each pair (file order), runs on TRL's batches apart; a PNG."""
    import subprocess

    pytest.importorskip("matplotlib")
    from conftest import REPO

    results = tmp_path / "results.jsonl"
    line = {"date": "2026-11-24", "ours_peak_mib": 1000, "trl_peak_mib": 1500, "ungrouped": False}
    results.write_text(
        "".join(
            json.dumps(line | extra) + "\n"
            for extra in (
                {"pair": "dpo", "ratio": 2.5},
                {"pair": "sft", "ratio": 3.0},
                {"pair": "dpo", "ratio": 2.6},
                {"pair": "dpo", "ratio": 1.9, "ungrouped": True},
            )
        )
    )
    out = tmp_path / "ratios.png"
    command = [sys.executable, "benchmarks/figure.py", "--results", str(results), "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert "sft 3.00, dpo 2.60" in proc.stdout and out.read_bytes()[:8] == PNG_MAGIC
    results.write_text(json.dumps({"pair": "dpo"}) + "\n")
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "missing ['date', 'ours_peak_mib', 'ratio', 'trl_peak_mib']" in proc.stderr
