"""Config objects: fvcore's ``CfgNode`` with errors that name the file and the key."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from .ranges import range_errors

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
    """``fvcore.common.config.CfgNode`` whose merges report unknown keys and bad values clearly.

    Every merge from a file or from command-line overrides checks the values against
    ``config/ranges.py`` and raises ``ConfigError`` naming the key and its allowed range.
    """

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> dict[str, Any]:
        """fvcore's ``_BASE_`` composition, with one-line errors for empty files, files that are
        not a mapping and ``_BASE_`` cycles (fvcore fails with a TypeError or a RecursionError)."""
        return _load_with_bases(cls, filename, allow_unsafe, chain=())

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"Config file '{cfg_filename}' does not exist.")
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"In config file '{cfg_filename}': {_message(e)}") from e
        self.check_values(f"In config file '{cfg_filename}'")

    def merge_from_list(self, cfg_list: Sequence[str]) -> None:
        if len(cfg_list) % 2:
            raise ConfigError(
                "Command-line overrides must be KEY VALUE pairs; got an odd number: "
                f"{list(cfg_list)}"
            )
        try:
            super().merge_from_list(list(cfg_list))
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"In command-line overrides: {_message(e)}") from e
        self.check_values("In command-line overrides")

    def check_values(self, where: str) -> None:
        """Raises ConfigError, starting with ``where``, listing every value outside its range."""
        errors = range_errors(self)
        if errors:
            raise ConfigError(f"{where}: {' '.join(errors)}")


def _load_with_bases(
    cls: type, filename: str, allow_unsafe: bool, chain: tuple[str, ...]
) -> dict[str, Any]:
    """``filename`` merged over its ``_BASE_`` files; ``chain``: the files that inherit from it."""
    path = os.path.realpath(filename)
    if path in chain:
        cycle = " -> ".join([*chain[chain.index(path) :], path])
        raise ConfigError(f"_BASE_ cycle in config files: {cycle}")
    loaded = _read_mapping(cls, filename, allow_unsafe)
    bases = loaded.pop(BASE_KEY, None)
    if bases is None:
        return loaded
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"In config file '{filename}': _BASE_ must be a file name or a list of them, not "
            f"{bases!r}."
        )
    merged: dict[str, Any] = {}
    for base in bases:
        base_file = _base_path(filename, base)
        if not os.path.isfile(base_file):
            raise FileNotFoundError(
                f"While reading config '{filename}': its _BASE_ '{base_file}' does not exist."
            )
        _merge_into(
            _load_with_bases(cls, base_file, allow_unsafe, (*chain, path)), merged, base_file
        )
    _merge_into(loaded, merged, filename)
    return merged


def _read_mapping(cls: type, filename: str, allow_unsafe: bool) -> dict[str, Any]:
    """The YAML mapping in ``filename``; ConfigError for an empty file, a syntax error or a
    document that is not a mapping."""
    with cls._open_cfg(filename) as f:
        text = f.read()
    try:
        loaded = _parse_yaml(text, filename, allow_unsafe)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"Config file '{filename}' is not valid YAML: {' '.join(str(e).split())}"
        ) from e
    if loaded is None:
        raise ConfigError(
            f"Config file '{filename}' is empty; expected a YAML mapping of config keys."
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"Config file '{filename}' must hold a YAML mapping of config keys, not a "
            f"{type(loaded).__name__}."
        )
    return loaded


def _parse_yaml(text: str, filename: str, allow_unsafe: bool) -> Any:
    """``yaml.safe_load``; as fvcore does, ``yaml.unsafe_load`` (with a warning) only when
    ``allow_unsafe`` and the safe loader refuses a tag."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        if not allow_unsafe:
            raise
        logger.warning(
            "Loading config %s with yaml.unsafe_load: it may run code from the file.", filename
        )
        return yaml.unsafe_load(text)


def _base_path(filename: str, base: str) -> str:
    """``base`` as written in ``filename``'s ``_BASE_``: absolute, ``~``, or relative to the
    file."""
    base = os.path.expanduser(base)
    return base if os.path.isabs(base) else os.path.join(os.path.dirname(filename), base)


def _merge_into(a: dict[str, Any], b: dict[str, Any], filename: str) -> None:
    """Merges mapping ``a`` (read from ``filename``) into ``b``, recursively; ``a`` wins."""
    for key, value in a.items():
        if isinstance(value, dict) and key in b:
            if not isinstance(b[key], dict):
                raise ConfigError(
                    f"In config file '{filename}': '{key}' is a group of keys, but its _BASE_ "
                    "sets it to a value."
                )
            _merge_into(value, b[key], filename)
        else:
            b[key] = value


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
