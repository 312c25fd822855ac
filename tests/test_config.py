"""Configs: every file loads and builds, unknown keys are errors that name the key, and every
default key is read by the code."""
from pathlib import Path

import pytest

from boxteacher.build import build_model
from boxteacher.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def test_config_files_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIG_FILES}
    assert {"CondInst/Base-CondInst.yaml", "CondInst/MS_R_50_1x.yaml", "CondInst/MS_R_101_3x.yaml"} <= names
    assert any(n.startswith("quickstart/") for n in names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_file_loads_and_builds(path):
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu"])
    assert cfg.is_frozen()
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_base_inheritance_and_overrides():
    cfg = load_config(str(REPO / "configs/CondInst/MS_R_101_3x.yaml"), ["SOLVER.BASE_LR", "0.02"])
    assert cfg.MODEL.RESNETS.DEPTH == 101  # leaf file
    assert cfg.MODEL.CONDINST.MAX_PROPOSALS == 500  # from Base-CondInst.yaml
    assert tuple(cfg.SOLVER.STEPS) == (210000, 250000)
    assert cfg.SOLVER.BASE_LR == 0.02  # command line


def test_unknown_key_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  FCOS:\n    NUM_CLASES: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*MODEL\.FCOS\.NUM_CLASES"):
        load_config(str(path))


def test_unknown_key_on_the_command_line_names_the_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_LRR"):
        load_config(str(CONFIG_FILES[0]), ["SOLVER.BASE_LRR", "0.1"])


def test_wrong_value_type_and_odd_overrides_are_errors():
    with pytest.raises(ConfigError, match="MODEL.FCOS.NUM_CLASSES"):
        load_config(str(CONFIG_FILES[0]), ["MODEL.FCOS.NUM_CLASSES", "many"])
    with pytest.raises(ConfigError, match="KEY VALUE"):
        load_config(str(CONFIG_FILES[0]), ["SOLVER.BASE_LR"])


def test_missing_config_file_and_missing_base(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "missing-base.yaml"\n')
    with pytest.raises(FileNotFoundError, match="child.yaml"):
        load_config(str(child))


def test_detectron2_keys_without_meaning_here_are_ignored(tmp_path):
    path = tmp_path / "adelaidet_style.yaml"
    path.write_text('VERSION: 2\nMODEL:\n  MASK_ON: True\n  PROPOSAL_GENERATOR:\n    NAME: "FCOS"\n')
    cfg = load_config(str(path))
    assert "MASK_ON" not in cfg.MODEL
