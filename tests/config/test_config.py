"""Configs: every file loads and builds, unknown keys are errors that name the key, and every
default key is read by the code."""

import re

import pytest

from boxteacher.build import build_model
from boxteacher.config import ConfigError, get_cfg, load_config
from boxteacher.config.ranges import CHECKED_ELSEWHERE, RANGES, _lookup, range_errors

from tiny_models import REPO

CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


def test_config_files_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIG_FILES}
    assert {
        "CondInst/Base-CondInst.yaml",
        "CondInst/MS_R_50_1x.yaml",
        "CondInst/MS_R_101_3x.yaml",
    } <= names
    assert any(n.startswith("quickstart/") for n in names)


@pytest.mark.parametrize(
    "path", CONFIG_FILES, ids=lambda p: p.relative_to(REPO / "configs").as_posix()
)
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
    path.write_text(
        'VERSION: 2\nMODEL:\n  MASK_ON: True\n  PROPOSAL_GENERATOR:\n    NAME: "FCOS"\n'
    )
    cfg = load_config(str(path))
    assert "MASK_ON" not in cfg.MODEL


# --- value ranges (boxteacher/config/ranges.py) -----------------------------------------------

BAD_OVERRIDES = [
    ("SOLVER.BASE_LR", "-0.01"),
    ("SOLVER.BASE_LR", "0.0"),
    ("SOLVER.WEIGHT_DECAY", "-0.0001"),
    ("SOLVER.MOMENTUM", "-0.9"),
    ("SOLVER.MOMENTUM", "1.0"),
    ("SOLVER.MAX_ITER", "0"),
    ("SOLVER.MAX_ITER", "-100"),
    ("SOLVER.CHECKPOINT_PERIOD", "0"),
    ("SOLVER.STEPS", "(3000, 2000)"),
    ("SOLVER.STEPS", "(2000, 2000)"),
    ("SOLVER.STEPS", "(0,)"),
    ("SOLVER.IMS_PER_BATCH", "0"),
    ("SOLVER.GAMMA", "0.0"),
    ("SOLVER.WARMUP_FACTOR", "1.5"),
    ("SOLVER.WARMUP_ITERS", "-1"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.0"),
    ("MODEL.FCOS.NUM_CLASSES", "0"),
    ("MODEL.FCOS.NUM_CLASSES", "-3"),
    ("MODEL.FCOS.PRIOR_PROB", "1.0"),
    ("MODEL.FCOS.NMS_TH", "1.5"),
    ("MODEL.FCOS.INFERENCE_TH_TEST", "-0.1"),
    ("MODEL.FCOS.POST_NMS_TOPK_TEST", "0"),
    ("MODEL.FCOS.FPN_STRIDES", "[8, 16, 0, 64, 128]"),
    ("MODEL.FCOS.FPN_STRIDES", "[8, 32, 16, 64, 128]"),
    ("MODEL.FCOS.SIZES_OF_INTEREST", "[64, 256, 128, 512]"),
    ("MODEL.CONDINST.MAX_PROPOSALS", "-2"),
    ("MODEL.CONDINST.MASK_HEAD.NUM_LAYERS", "0"),
    ("MODEL.BOX_TEACHER.MASK_AFFINITY_THRESH", "-0.5"),
    ("MODEL.BOX_TEACHER.MOMENTUM", "1.001"),
    ("MODEL.PIXEL_STD", "[57.0, 0.0, 58.0]"),
    ("MODEL.PIXEL_MEAN", "[103.5, 116.3]"),
    ("INPUT.MIN_SIZE_TRAIN", "()"),
    ("INPUT.MIN_SIZE_TRAIN", "(0, 800)"),
    ("INPUT.MAX_SIZE_TEST", "0"),
    ("DATALOADER.NUM_WORKERS", "-1"),
    ("TEST.EVAL_PERIOD", "-1"),
    ("VIS_PERIOD", "-10"),
]


@pytest.mark.parametrize("key,value", BAD_OVERRIDES, ids=lambda v: str(v))
def test_value_out_of_range_on_the_command_line_names_the_key(key, value):
    with pytest.raises(ConfigError, match=r"command-line overrides.*" + re.escape(key) + " must"):
        load_config(str(CONFIG_FILES[0]), [key, value])


@pytest.mark.parametrize("key,value", BAD_OVERRIDES[:8], ids=lambda v: str(v))
def test_value_out_of_range_in_a_file_names_the_file_and_key(tmp_path, key, value):
    *groups, leaf = key.split(".")
    text = (
        "".join(f"{'  ' * i}{g}:\n" for i, g in enumerate(groups))
        + f"{'  ' * len(groups)}{leaf}: {value}\n"
    )
    path = tmp_path / "bad_range.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad_range\.yaml.*" + re.escape(key)):
        load_config(str(path))


def _just_outside(key, allowed):
    """A value of the default's type just outside ``allowed`` (and not one of its special
    values)."""
    default = _lookup(get_cfg(), key)
    element = default[0] if isinstance(default, (list, tuple)) else default
    step = 1 if isinstance(element, int) else 0.5
    if allowed.low is not None:
        bad = allowed.low if allowed.low_open else allowed.low - step
        specials = {v for v, _ in allowed.special}
        while bad in specials:
            bad -= step
    else:
        bad = allowed.high if allowed.high_open else allowed.high + step
    bad = type(element)(bad)
    return [bad, *default[1:]] if isinstance(default, (list, tuple)) else bad


@pytest.mark.parametrize(
    "key", sorted(k for k, r in RANGES.items() if r.low is not None or r.high is not None)
)
def test_every_ranged_key_rejects_a_value_just_outside_its_range(key):
    bad = _just_outside(key, RANGES[key])
    with pytest.raises(ConfigError, match=re.escape(key) + " must"):
        get_cfg().merge_from_list([key, repr(bad)])


def test_defaults_and_special_values_are_in_range(tmp_path):
    assert range_errors(get_cfg()) == []
    path = tmp_path / "special.yaml"
    path.write_text(
        "MODEL:\n  CONDINST:\n    MAX_PROPOSALS: -1\n    TOPK_PROPOSALS_PER_IM: -1\n"
        "  BOX_TEACHER:\n    MASK_AFFINITY_THRESH: -1.0\n    EMA_HORIZON: 0.0\n"
        "  FCOS:\n    LOSS_ALPHA: -1.0\n"
        "SOLVER:\n  WARMUP_ITERS: 0\n  STEPS: ()\n  CLIP_GRADIENTS:\n    NORM_TYPE: .inf\n"
        "TEST:\n  EVAL_PERIOD: 0\nVIS_PERIOD: 0\nSEED: -1\nDATALOADER:\n  NUM_WORKERS: 0\n"
    )
    cfg = load_config(str(path))
    assert cfg.MODEL.CONDINST.MAX_PROPOSALS == -1 and cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE == float(
        "inf"
    )


def test_nan_is_out_of_every_range(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("SOLVER:\n  BASE_LR: .nan\n")
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_LR must be > 0"):
        load_config(str(path))


def test_every_bad_value_is_listed_in_one_error():
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_ITER must.*SOLVER\.BASE_LR must"):
        load_config(str(CONFIG_FILES[0]), ["SOLVER.BASE_LR", "-1.0", "SOLVER.MAX_ITER", "0"])


def _numeric_keys(node, prefix=""):
    for name, value in node.items():
        key = prefix + name
        if isinstance(value, dict):
            yield from _numeric_keys(value, key + ".")
        elif _is_numeric(value) or (
            isinstance(value, (list, tuple)) and value and all(map(_is_numeric, value))
        ):
            yield key


def _is_numeric(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_every_numeric_default_key_has_a_range_or_a_reason():
    numeric = set(_numeric_keys(get_cfg()))
    assert numeric - set(RANGES) - set(CHECKED_ELSEWHERE) == set()
    assert set(RANGES) | set(CHECKED_ELSEWHERE) <= numeric


# --- files: empty, not a mapping, _BASE_ cycles ------------------------------------------------


def test_empty_config_file_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml' is empty") as error:
        load_config(str(path))
    assert "\n" not in str(error.value)


def test_empty_base_file_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("")
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\nSOLVER:\n  BASE_LR: 0.1\n')
    with pytest.raises(ConfigError, match=r"base\.yaml' is empty"):
        load_config(str(child))


def test_config_file_with_a_yaml_syntax_error_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("SOLVER:\n  BASE_LR: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml' is not valid YAML") as error:
        load_config(str(path))
    assert "\n" not in str(error.value)


def test_config_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(str(path))


@pytest.mark.parametrize(
    "files", [{"a.yaml": "a.yaml"}, {"a.yaml": "b.yaml", "b.yaml": "c.yaml", "c.yaml": "a.yaml"}]
)
def test_base_cycle_is_a_one_line_error_naming_the_files(tmp_path, files):
    for name, base in files.items():
        (tmp_path / name).write_text(f'_BASE_: "{base}"\n')
    with pytest.raises(ConfigError, match=r"_BASE_ cycle") as error:
        load_config(str(tmp_path / "a.yaml"))
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in files)


def test_shared_base_is_not_a_cycle(tmp_path):
    (tmp_path / "root.yaml").write_text("SOLVER:\n  BASE_LR: 0.1\n")
    (tmp_path / "left.yaml").write_text('_BASE_: "root.yaml"\nSOLVER:\n  MAX_ITER: 10\n')
    (tmp_path / "right.yaml").write_text('_BASE_: "root.yaml"\nSOLVER:\n  IMS_PER_BATCH: 2\n')
    (tmp_path / "leaf.yaml").write_text('_BASE_: ["left.yaml", "right.yaml"]\n')
    cfg = load_config(str(tmp_path / "leaf.yaml"))
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (0.1, 10, 2)
