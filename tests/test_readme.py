"""The README's two quick-start commands are what CI runs; its Python example runs."""

import os
import re
import subprocess
import sys

import pytest

from tiny_models import REPO


def quick_start_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_quick_start_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install") and "train_net.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_install_and_test_command():
    ci = (REPO / ".ci/run").read_text()
    install, test = quick_start_commands()
    assert install.split(" && ")[0] in ci.splitlines()
    assert any(line.startswith(test) for line in ci.splitlines())
    config = install.split("--config-file ")[1].split()[0]
    assert (REPO / config).is_file()


@pytest.mark.slow
def test_the_python_api_example_trains_and_predicts(tmp_path):
    """The README's Python example, as written but for a 2-iteration schedule on small images,
    run in a fresh folder (the shapes dataset is generated into its ``datasets``)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    opts = re.search(r"^opts = \[.*\]$", code, re.M).group(0)
    tiny = opts[:-1] + (
        ', "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", '
        '"INPUT.MIN_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", '
        '"MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]'
    )
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "example.py").write_text(code.replace(opts, tiny))
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    proc = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "output/api_example/model_final.pth").is_file()
    assert "torch.Size([" in proc.stdout.splitlines()[-1]
