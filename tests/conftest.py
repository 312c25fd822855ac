"""Fixtures shared by the test tree (``tests/{modeling,data,engine,evaluation,config,tools}``).

``tiny_models.py`` (on the path through ``pythonpath`` in ``pyproject.toml``) holds the tiny
config and the tiny inputs as functions; these fixtures hand them to tests:

* ``tiny_config``: the config of the tiny CondInst (R-18 of 16 channels, 3 classes, CPU);
* ``shapes_datasets``: the built-in synthetic COCO dataset (``shapes_train`` / ``shapes_val``)
  generated and registered under a temporary datasets root, for the tests that train;
* ``shared_data``: ``../shared/data`` (carparts, coco128), the test is skipped without it;
* ``restored_loggers``: the project's and fvcore's loggers put back as they were after a test
  that sets them up (``default_setup``, ``setup_tool_logging``), whose handlers would hide the
  records of later tests from pytest's ``caplog``.

Tests marked ``slow`` (end-to-end training, command lines in subprocesses) are left out of the
fast subset: ``python -m pytest -m "not slow"``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from boxteacher.config import CfgNode

from tiny_models import SHARED_DATA, builtin_datasets_under, tiny_cfg


@pytest.fixture
def tiny_config() -> CfgNode:
    return tiny_cfg()


@pytest.fixture(scope="module")
def shapes_datasets(tmp_path_factory) -> Iterator[str]:
    """The root of the built-in datasets (also ``DETECTRON2_DATASETS`` for child processes),
    restored to the default root after the module."""
    with builtin_datasets_under(str(tmp_path_factory.mktemp("datasets"))) as root:
        yield root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} (the shared test data) is not available")
    return SHARED_DATA


@pytest.fixture
def restored_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("boxteacher", "fvcore")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
