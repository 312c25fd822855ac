"""Logging set-up: console on the main process, one log file per process."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from termcolor import colored

__all__ = ["setup_logger"]

_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"
# Marks the handlers installed by ``setup_logger`` so that calling it again replaces them.
_HANDLER_TAG = "_boxteacher_handler"


class _ConsoleFormatter(logging.Formatter):
    """Short logger names (``boxteacher.engine.hooks`` -> ``bt.engine.hooks``), coloured levels."""

    def __init__(self, *args, root_name: str, abbrev_name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._root_name = root_name + "."
        self._abbrev_name = abbrev_name + "." if abbrev_name else ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        short = logging.makeLogRecord(record.__dict__)  # the file handler sees the same record
        short.name = record.name.replace(self._root_name, self._abbrev_name, 1)
        message = super().formatMessage(short)
        if record.levelno >= logging.ERROR:
            return colored("ERROR ", "red", attrs=["blink", "underline"]) + message
        if record.levelno == logging.WARNING:
            return colored("WARNING ", "red", attrs=["blink"]) + message
        return message


def _log_file(output: str, distributed_rank: int) -> str:
    path = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
    if distributed_rank > 0:
        path = f"{path}.rank{distributed_rank}"
    return path


def setup_logger(
    output: str | None = None,
    distributed_rank: int = 0,
    name: str = "boxteacher",
    *,
    abbrev_name: str | None = None,
    color: bool = True,
    console_level: int = logging.INFO,
    stream: TextIO | None = None,
) -> logging.Logger:
    """Configure the logger ``name`` (and so all of its children) and return it.

    Args:
        output: a directory (the log goes to ``output/log.txt``) or a file path ending in
            ``.txt`` / ``.log``. ``None``: no file. Processes of rank N > 0 write to
            ``<file>.rankN``.
        distributed_rank: rank of this process; only rank 0 logs to the console.
        name: the logger to configure.
        abbrev_name: shorter name shown on the console (default "bt" for "boxteacher").
        color: colour WARNING / ERROR on the console.
        console_level: the least level shown on the console (the file gets DEBUG too).
        stream: where the console lines go (default ``sys.stdout``; the tools use
            ``sys.stderr``, so that their tables alone are on ``sys.stdout``).

    Calling it again replaces the handlers it installed before, so it is idempotent.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # our handlers print everything once
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_TAG, False)]:
        logger.removeHandler(handler)
        handler.close()

    if abbrev_name is None:
        abbrev_name = "bt" if name == "boxteacher" else name
    plain = logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT)
    handlers: list[logging.Handler] = []
    if distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout if stream is None else stream)
        console.setLevel(console_level)  # debug details (e.g. pycocotools' output) go to the file
        if color:
            console.setFormatter(
                _ConsoleFormatter(
                    colored("[%(asctime)s %(name)s]: ", "green") + "%(message)s",
                    datefmt=_DATE_FORMAT,
                    root_name=name,
                    abbrev_name=abbrev_name,
                )
            )
        else:
            console.setFormatter(plain)
        handlers.append(console)
    if output is not None:
        path = _log_file(output, distributed_rank)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(plain)
        handlers.append(file_handler)
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        logger.addHandler(handler)
    return logger
