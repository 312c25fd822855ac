"""The common command line and set-up of ``train_net.py`` and the tools
(``boxteacher.engine.defaults``)."""

import json
import logging

import pytest
import torch

from boxteacher.config import get_cfg
from boxteacher.data import is_registered
from boxteacher.engine import (
    default_argument_parser,
    default_setup,
    setup_config,
    setup_tool_logging,
)


def test_the_training_command_line_is_detectron2s():
    args = default_argument_parser().parse_args(
        ["--config-file", "a.yaml", "--num-gpus", "8", "--resume", "SOLVER.BASE_LR", "0.1"]
    )
    assert (args.config_file, args.num_gpus, args.resume, args.eval_only) == (
        "a.yaml",
        8,
        True,
        False,
    )
    assert (args.num_machines, args.machine_rank, args.dist_url) == (1, 0, "auto")
    assert args.opts == ["SOLVER.BASE_LR", "0.1"]
    assert default_argument_parser().parse_args([]).config_file == ""


def test_a_tool_extends_the_parser_with_its_own_flags_and_no_training_flags(capsys):
    parser = default_argument_parser(description="A tool.", config="required", training=False)
    parser.add_argument("--input", nargs="+")
    args = parser.parse_args(
        ["--input", "x.png", "y.png", "--config-file", "c.yaml", "MODEL.WEIGHTS", "w.pth"]
    )
    assert args.input == ["x.png", "y.png"] and args.opts == ["MODEL.WEIGHTS", "w.pth"]
    assert not hasattr(args, "num_gpus")
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "x.png"])
    assert "--config-file" in capsys.readouterr().err
    many = default_argument_parser(config="many", training=False).parse_args(
        ["--config-file", "a.yaml", "b.yaml"]
    )
    assert many.config_file == ["a.yaml", "b.yaml"]
    bare = default_argument_parser(config="none", overrides=False, training=False).parse_args([])
    assert vars(bare) == {}
    with pytest.raises(ValueError, match="config must be one of"):
        default_argument_parser(config="some")


def test_setup_config_registers_the_datasets_the_config_names_by_path(tmp_path):
    json_file = tmp_path / "own.json"
    json_file.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )
    config = tmp_path / "own.yaml"
    config.write_text("DATASETS:\n  TRAIN: ('own_by_path',)\n")
    assert not is_registered("own_by_path")
    cfg = setup_config(
        str(config), ["DATASETS.REGISTER", str([["own_by_path", str(json_file), str(tmp_path)]])]
    )
    assert cfg.DATASETS.TRAIN == ("own_by_path",) and is_registered("own_by_path")


def test_tool_logging_goes_to_stderr_at_the_level_asked(capsys, restored_loggers):
    setup_tool_logging(logging.WARNING)
    logger = logging.getLogger("boxteacher.some_tool")
    logger.info("not shown")
    logger.warning("shown")
    captured = capsys.readouterr()
    assert "shown" in captured.err and "not shown" not in captured.err and captured.out == ""


def test_argument_parser_and_default_setup(tmp_path, restored_loggers):
    args = default_argument_parser().parse_args(
        ["--num-gpus", "2", "--resume", "SOLVER.BASE_LR", "0.1", "OUTPUT_DIR", str(tmp_path)]
    )
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 1, 0)
    assert args.resume and not args.eval_only and args.dist_url == "auto"
    cfg = get_cfg()
    cfg.merge_from_list(args.opts)
    cfg.SEED = 11
    assert default_setup(cfg, args) == 11
    first = torch.rand(2)
    default_setup(cfg, args)  # idempotent: no duplicated handlers
    assert torch.equal(torch.rand(2), first)
    logging.getLogger("boxteacher.engine.test").info("hello from the test")
    log = (tmp_path / "log.txt").read_text()
    assert log.count("hello from the test") == 1 and "Environment info" in log
    reloaded = get_cfg()
    reloaded.merge_from_file(str(tmp_path / "config.yaml"))
    assert reloaded.SOLVER.BASE_LR == 0.1
