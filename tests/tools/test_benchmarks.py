"""Smoke calls of the benchmark tools (their figures are measured by hand, not in tests)."""

import json
import os
import subprocess
import sys

import pytest

from tiny_models import REPO

pytestmark = pytest.mark.slow  # every tool runs as a command line


def run_tool(name, *args, env=None):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_accuracy_trains_and_tabulates_the_three_methods(tmp_path):
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_accuracy.py",
        "--iters",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--min-size-train",
        "64",
        "--min-size-test",
        "64",
        "--output-dir",
        tmp_path / "bench",
        "DATALOADER.NUM_WORKERS",
        "0",
        env=env,
    )
    assert "| CondInst" in out and "| BoxInst" in out and "| BoxTeacher" in out
    results = json.loads((tmp_path / "bench/results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["CondInst", "BoxInst", "BoxTeacher"]
    assert all(0 <= r["AP"] <= 100 and r["wall_minutes"] >= 0 for r in results)
    runs = json.loads((tmp_path / "bench/results.json").read_text())["runs"]
    assert "MODEL.BOX_TEACHER.WARMUP_ITERS 1" in runs[2]["command"]
    assert (tmp_path / "bench/results.md").read_text().startswith("| method")


def test_benchmark_accuracy_of_mask_rcnn_over_seeds(tmp_path):
    """Mask R-CNN with masks and as BoxTeacher's student, two seeds each: a row per method with the
    mean and spread, the ratio to the same detector with masks."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_accuracy.py",
        "--methods",
        "maskrcnn",
        "boxteacher_maskrcnn",
        "--seeds",
        "1",
        "2",
        "--iters",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--min-size-train",
        "64",
        "--min-size-test",
        "64",
        "--output-dir",
        tmp_path / "bench",
        "DATALOADER.NUM_WORKERS",
        "0",
        env=env,
    )
    assert "| Mask R-CNN " in out and "| BoxTeacher, Mask R-CNN student" in out
    saved = json.loads((tmp_path / "bench/results.json").read_text())
    assert [(r["key"], r["seed"]) for r in saved["runs"]] == [
        ("maskrcnn", 1),
        ("boxteacher_maskrcnn", 1),
        ("maskrcnn", 2),
        ("boxteacher_maskrcnn", 2),
    ]
    assert [r["seeds"] for r in saved["results"]] == [[1, 2], [1, 2]]
    for row in saved["results"]:
        runs = [r for r in saved["runs"] if r["key"] == row["key"]]
        assert row["seed_APs"] == [r["AP"] for r in runs]
        assert (
            row["AP"] == pytest.approx(sum(r["AP"] for r in runs) / 2, abs=0.051)
            and row["AP_std"] >= 0
        )
    assert all(f"SEED {r['seed']}" in r["command"] for r in saved["runs"])
    assert (tmp_path / "bench/boxteacher_maskrcnn/seed2/model_final.pth").is_file()


def test_benchmark_accuracy_with_a_fraction_of_the_masks(tmp_path):
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_accuracy.py",
        "--methods",
        "boxinst",
        "--mask-fraction",
        "0.5",
        "--iters",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--min-size-train",
        "64",
        "--min-size-test",
        "64",
        "--output-dir",
        tmp_path / "bench",
        "DATALOADER.NUM_WORKERS",
        "0",
        env=env,
    )
    assert "| BoxInst" in out and "boxes + 50% masks" in out
    result = json.loads((tmp_path / "bench/results.json").read_text())["runs"][0]
    assert "MODEL.BOXINST.GT_MASKS fraction MODEL.BOXINST.GT_MASK_FRACTION 0.5" in result["command"]
    assert (tmp_path / "bench/boxinst/mask_image_ids.json").is_file()


def test_benchmark_accuracy_semi_supervised(tmp_path):
    """--labeled-fractions (--only-fractions: not on all images): the labelled part alone, then
    the part plus the unlabelled rest with the labelled-only run as pre-trained teacher; the
    split is written and the second table gives the gain."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_accuracy.py",
        "--methods",
        "boxteacher",
        "--labeled-fractions",
        "0.3",
        "--only-fractions",
        "--iters",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--min-size-train",
        "64",
        "--min-size-test",
        "64",
        "--output-dir",
        tmp_path / "bench",
        "DATALOADER.NUM_WORKERS",
        "0",
        env=env,
    )
    assert "| BoxTeacher, 30 % labelled " in out and "share of the gap closed" in out
    runs = json.loads((tmp_path / "bench/results.json").read_text())["runs"]
    assert [r["key"] for r in runs] == ["boxteacher_30pct", "semi_boxteacher_30pct"]
    labeled, unlabeled = (
        json.loads((tmp_path / f"bench/splits/instances_train_30pct_seed1_{part}.json").read_text())
        for part in ("labeled", "unlabeled")
    )
    assert (len(labeled["images"]), len(unlabeled["images"])) == (90, 210)
    assert "DATASETS.UNLABELED" not in runs[0]["command"]
    teacher = tmp_path / "bench/boxteacher_30pct/model_final.pth"
    assert f"MODEL.SEMI.TEACHER_WEIGHTS {teacher} MODEL.SEMI.BURN_IN_ITERS 1" in runs[1]["command"]
    assert "DATASETS.UNLABELED ('unlabeled_30pct',)" in runs[1]["command"]


def test_benchmark_speed_compares_boxinst_and_boxteacher_with_a_breakdown(tmp_path):
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_speed.py",
        "--config-file",
        "configs/quickstart/boxinst_shapes.yaml",
        "configs/quickstart/boxteacher_shapes.yaml",
        "--batch-size",
        "2",
        "--short-side",
        "64",
        "--iters",
        "2",
        "--with-data",
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "0",
        env=env,
    )
    table, breakdown = out.strip().split("\n\n")
    assert "| BoxInst" in table and "| BoxTeacher" in table and "1.00x" in table
    shares = {}
    for line in breakdown.splitlines()[2:]:
        model, part, share = (cell.strip() for cell in line.strip("|").split("|"))
        shares.setdefault(model, {})[part] = float(share)
    assert "teacher pass" in shares["BoxTeacher"] and "teacher pass" not in shares["BoxInst"]
    for parts in shares.values():
        assert {"backbone", "heads", "mask targets", "backward + optimizer"} <= set(parts)
        assert sum(parts.values()) == pytest.approx(100, abs=1.0)


def test_benchmark_teacher_postprocess_keeps_the_assignable_detections():
    out = run_tool(
        "benchmark_teacher_postprocess.py",
        "--teacher-size",
        "64",
        "96",
        "--student-size",
        "48",
        "64",
        "--detections",
        "20",
        "--boxes",
        "3",
        "--near-fraction",
        "0.5",
        "--repeats",
        "1",
    )
    rows = [
        line.strip("|").split("|")
        for line in out.splitlines()
        if line.startswith("| ") and "ms per" not in line
    ]
    masks = {name.strip(): float(count) for name, count, *_ in rows}
    assert masks["every detection (release)"] == 20
    assert (
        10 <= masks["assignable detections only"] < 20
    )  # the jittered copies of the boxes, maybe a few more
    assert masks["assigned masks as they are"] == masks["guided filter, radius 4"] == 3


def test_benchmark_training_counts_operators_and_syncs_per_part(tmp_path):
    """Without --weights the tool first trains the first config (a 2-iteration BoxInst)."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    out = run_tool(
        "benchmark_training.py",
        "--config-file",
        "configs/quickstart/boxinst_shapes.yaml",
        "configs/quickstart/boxteacher_shapes.yaml",
        "--pretrain-iters",
        "2",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--profile-iters",
        "1",
        "--json",
        tmp_path / "steps.json",
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MIN_SIZE_TEST",
        "64",
        env=env,
    )
    assert "| BoxInst" in out and "| BoxTeacher" in out and "operator calls / step" in out
    boxinst, boxteacher = json.loads((tmp_path / "steps.json").read_text())["results"]
    for result in (boxinst, boxteacher):
        assert (
            result["seconds_per_iter"] > 0
            and result["ops_per_step"] > 100
            and result["syncs_per_step"] >= 1
        )
        parts = {p["part"]: p for p in result["parts"]}
        assert {
            "forward",
            "student: network",
            "student: mask losses",
            "backward",
            "optimizer",
        } <= set(parts)
        assert sum(p["ops"] for p in result["parts"]) == result["ops_per_step"]
    teacher_parts = {p["part"] for p in boxteacher["parts"]}
    assert {
        "teacher: network",
        "pseudo labels: assignment",
        "pseudo labels: refinement",
        "ema",
    } <= teacher_parts
    assert not any(p["part"].startswith("teacher") for p in boxinst["parts"])


def test_gpu_check_runs_every_part_and_prints_one_table(tmp_path):
    """A smoke run on the CPU (``--quick``): the targets are GPU targets, so rows may fail (and
    a bfloat16 step on a CPU may even diverge: only its row is checked)."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "gpu_check.py"),
            "--quick",
            "--device",
            "cpu",
            "--skip",
            "pytest",
            "--output",
            str(tmp_path / "check.json"),
            "DATALOADER.NUM_WORKERS",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "check.json").read_text())
    checks = [r["check"] for r in rows]
    assert checks[:2] == [
        "BoxTeacher / BoxInst step (float32, real data)",
        "BoxTeacher / BoxInst step (AMP, real data)",
    ]
    assert checks[2] == "AMP speed-up (synthetic batch)" and checks[3].startswith(
        "pairwise term (packed), boxes, 16 instances"
    )
    assert all(r["measured"] != "-" for i, r in enumerate(rows) if i != 1), rows
    assert "| check" in proc.stdout
