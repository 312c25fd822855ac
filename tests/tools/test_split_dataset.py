"""``tools/split_dataset.py`` as a command line."""

import json
import subprocess
import sys

import pytest

from boxteacher.data.coco import load_coco_json

from tiny_models import REPO

pytestmark = pytest.mark.slow  # command lines in subprocesses


def run_split(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools/split_dataset.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tool_writes_both_parts_and_prints_the_counts(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(1, 11)]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0}
        for i in range(1, 11)
    ]
    source = tmp_path / "train.json"
    source.write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
        )
    )
    proc = run_split(
        "--json", source, "--fraction", "0.3", "--seed", "5", "--output-dir", tmp_path / "semi"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labeled, unlabeled = (
        tmp_path / "semi/train_30pct_seed5_labeled.json",
        tmp_path / "semi/train_30pct_seed5_unlabeled.json",
    )
    assert f"3 labelled images (3 annotations) -> {labeled}" in proc.stdout
    assert f"7 unlabelled images -> {unlabeled}" in proc.stdout
    assert "labelled image ids" in proc.stderr
    records = load_coco_json(str(labeled), str(tmp_path))
    assert len(records) == 3 and all(len(r["annotations"]) == 1 for r in records)
    assert json.loads(unlabeled.read_text())["annotations"] == []
    again = run_split(
        "--json", source, "--fraction", "0.3", "--seed", "5", "--output-dir", tmp_path / "again"
    )
    assert (
        again.returncode == 0
        and (tmp_path / "again" / labeled.name).read_text() == labeled.read_text()
    )


def test_the_tool_refuses_a_fraction_of_zero_or_one_and_a_malformed_json(tmp_path):
    source = tmp_path / "train.json"
    source.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    for fraction in ("0", "1"):
        proc = run_split("--json", source, "--fraction", fraction)
        assert proc.returncode == 2 and "strictly between 0 and 1" in proc.stderr
    (tmp_path / "bad.json").write_text("{}")
    proc = run_split("--json", tmp_path / "bad.json", "--fraction", "0.5")
    assert (
        proc.returncode != 0
        and "bad.json" in proc.stderr
        and "not a COCO instances file" in proc.stderr
    )
