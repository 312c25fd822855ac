"""Config objects: fvcore's ``CfgNode`` with errors that name the file and the key."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from fvcore.common.config import CfgNode as _FvcoreCfgNode

logger = logging.getLogger(__name__)

# Keys of detectron2 / AdelaiDet configs that have no meaning here (this project builds one
# kind of proposal generator and always predicts masks). They are accepted with a warning so
# that the official YAML files load; any other unknown key is an error.
IGNORED_KEYS = (
    "VERSION",
    "MODEL.MASK_ON",
    "MODEL.PROPOSAL_GENERATOR",
    "MODEL.PROPOSAL_GENERATOR.NAME",
)


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the file and key in the message."""


class CfgNode(_FvcoreCfgNode):
    """``fvcore.common.config.CfgNode`` whose merges report unknown keys and bad values clearly."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"Config file '{cfg_filename}' does not exist.")
        try:
            loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"While reading config '{cfg_filename}': {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file '{cfg_filename}' must hold a YAML mapping of keys.")
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"In config file '{cfg_filename}': {_message(e)}") from e

    def merge_from_list(self, cfg_list: Sequence[str]) -> None:
        if len(cfg_list) % 2:
            raise ConfigError(
                f"Command-line overrides must be KEY VALUE pairs; got an odd number: {list(cfg_list)}"
            )
        try:
            super().merge_from_list(list(cfg_list))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"In command-line overrides: {_message(e)}") from e


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    if "Non-existent" in text:
        key = text.split(":", 1)[1].strip()
        return (
            f"unknown config key '{key}'. Valid keys are listed, with comments, in "
            "boxteacher/config/defaults.py."
        )
    return text


def get_cfg() -> CfgNode:
    """A fresh copy of the default config (see ``boxteacher/config/defaults.py``)."""
    from .defaults import _C

    cfg = CfgNode(_C.clone())
    for key in IGNORED_KEYS:
        cfg.register_deprecated_key(key)
    return cfg


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """Defaults, then ``config_file`` (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides;
    returned frozen."""
    cfg = get_cfg()
    if not config_file:
        raise ConfigError("No config file given (use --config-file FILE).")
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg
