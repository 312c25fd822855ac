"""tools/plot_metrics.py (training curves from metrics.json) and tools/analyze_model.py
(parameters and FLOPs)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from boxteacher.build import build_model
from boxteacher.config import load_config
from boxteacher.utils.training_curves import (
    MetricsError,
    read_metrics,
    series,
    write_plots,
)

from tiny_models import REPO, TINY_MODEL_OVERRIDES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_line(iteration, **extra):
    return {
        "iteration": iteration,
        "loss_fcos_cls": 1.0 / (iteration + 1),
        "loss_prj": 0.5,
        "total_loss": 1.5,
        "lr": 0.01 * iteration,
        "time": 0.3,
        **extra,
    }


def write_metrics(folder: Path, lines: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "metrics.json").write_text(text + "\n")


@pytest.mark.slow
def test_plot_metrics_writes_one_png_per_group_and_skips_malformed_lines(tmp_path):
    teacher = {"num_pseudo_masks": 3.0, "ema_momentum": 0.9}
    write_metrics(
        tmp_path / "run",
        [
            train_line(19, **teacher),
            train_line(39, **teacher, param_diff=0.1),
            '{"iteration": 59, "loss_prj": 0.4',  # truncated line of an interrupted write
            train_line(59, **teacher, param_diff=0.2),
            {
                "iteration": 60,
                "bbox/AP": 40.0,
                "bbox/AP50": 60.0,
                "segm/AP": 30.0,
                "segm/AP75": 25.0,
            },
            train_line(79, **teacher),
            {
                "iteration": 80,
                "bbox/AP": 45.0,
                "bbox/AP50": 65.0,
                "segm/AP": 35.0,
                "segm/AP75": 28.0,
            },
        ],
    )
    proc = run_tool("plot_metrics.py", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    plots = tmp_path / "run/plots"
    assert proc.stdout.split() == [
        str(plots / n) for n in ("losses.png", "lr.png", "eval_ap.png", "boxteacher.png")
    ]
    for path in plots.iterdir():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 5_000 < len(data) < 500_000, (path, len(data))
    assert f"{tmp_path / 'run/metrics.json'}:3" in proc.stderr

    # A run without evaluation or teacher: only the losses and the learning rate.
    write_metrics(tmp_path / "plain", [train_line(19), train_line(39)])
    proc = run_tool("plot_metrics.py", tmp_path / "plain", "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["losses.png", "lr.png"]


@pytest.mark.slow
def test_plot_metrics_errors_and_selected_keys(tmp_path):
    proc = run_tool("plot_metrics.py", tmp_path / "nothing")
    assert proc.returncode != 0 and str(tmp_path / "nothing/metrics.json") in proc.stderr

    write_metrics(tmp_path, [train_line(19), train_line(39)])
    records = read_metrics(str(tmp_path / "metrics.json"))
    paths = write_plots(records, str(tmp_path / "sel"), keys=["time", "loss_*"])
    assert [Path(p).name for p in paths] == ["selected_keys.png"]
    with pytest.raises(MetricsError, match="loss_fcos_cls"):
        write_plots(records, str(tmp_path / "sel"), keys=["segm/AP"])


def test_read_metrics_keeps_the_records_of_a_resumed_run(tmp_path):
    write_metrics(
        tmp_path,
        [
            train_line(19),
            train_line(39),
            train_line(59),  # crashed after iteration 59
            train_line(39, loss_prj=0.25),
            "[1, 2]",
            {"iteration": "79"},
            train_line(79),  # resumed at 20
        ],
    )
    records = read_metrics(str(tmp_path / "metrics.json"))
    assert [r["iteration"] for r in records] == [19, 39, 79]
    assert series(records, "loss_prj") == ([19, 39, 79], [0.5, 0.25, 0.5])


@pytest.mark.slow
def test_analyze_model_counts_flops_and_the_parameters_of_one_boxteacher_network():
    config = REPO / "configs/quickstart/boxteacher_shapes.yaml"
    proc = run_tool(
        "analyze_model.py", "--config-file", config, "--short-side", "64", *TINY_MODEL_OVERRIDES
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    student = build_model(load_config(str(config), TINY_MODEL_OVERRIDES)).student
    expected = sum(p.numel() for p in student.parameters())

    assert "teacher and student are the same network" in proc.stdout
    total, trainable = re.search(
        r"parameters: ([\d,]+) total, ([\d,]+) trainable", proc.stdout
    ).groups()
    assert int(total.replace(",", "")) == int(trainable.replace(",", "")) == expected
    flops = int(re.search(r"FLOPs: ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    assert flops > 0
    assert re.search(r"\| network\s+\|", proc.stdout) and "| backbone " in proc.stdout
