"""Convert a weight file to this project's checkpoint format, once.

    python tools/convert_weights.py IN OUT [--trust-pickle]

IN is anything ``MODEL.WEIGHTS`` reads (detectron2 / AdelaiDet / BoxTeacher checkpoints, Caffe2
or detectron2 ``.pkl`` files, torchvision ``.pth`` files, this project's checkpoints); OUT is
``{"model": state dict}`` in this project's parameter names, readable with
``torch.load(weights_only=True)``. Only model weights are kept (no optimizer state).

A conversion that gives no network is an error and writes nothing: OUT must hold at least
``MIN_BACKBONE_TENSORS`` tensors of a backbone (names with a ``backbone.`` part after renaming,
e.g. ``backbone.bottom_up.conv1.weight`` or ``teacher.backbone...``). The smallest ResNet (R-18)
has over 100; files such as optimizer states, metadata or a handful of unrelated arrays have none.

``--trust-pickle`` reads IN with ``torch.load(weights_only=False)``, which executes any code
pickled in the file: use it only for files from a source you trust, e.g. PyTorch's legacy
``.tar`` format or checkpoints holding pickled modules. The output is safe to load afterwards.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time

import torch

from boxteacher.engine.checkpoint import atomic_open
from boxteacher.engine.weight_files import CheckpointError, load_trusted_checkpoint_file, read_model_weights

logger = logging.getLogger("convert_weights")

MIN_BACKBONE_TENSORS = 20
_BACKBONE_NAME = re.compile(r"(^|\.)backbone\.")


def convert(src: str, dst: str, trust_pickle: bool = False) -> int:
    """Write the model weights of ``src`` to ``dst`` atomically; returns the number of tensors.

    Raises CheckpointError, and writes nothing, when ``src`` gives too few backbone tensors.
    """
    checkpoint = load_trusted_checkpoint_file(src) if trust_pickle else read_model_weights(src)
    state = {k: v for k, v in checkpoint["model"].items() if isinstance(v, torch.Tensor)}
    dropped = sorted(set(checkpoint["model"]) - set(state))
    if dropped:
        logger.warning("Entries that are not tensors are left out: %s", dropped)
    check_has_network(src, state)
    with atomic_open(dst) as f:
        torch.save({"model": state, "__author__": f"converted from {src}"}, f)
    return len(state)


def check_has_network(src: str, state: dict[str, torch.Tensor]) -> None:
    """Raises CheckpointError naming ``src`` unless ``state`` holds at least
    ``MIN_BACKBONE_TENSORS`` backbone tensors."""
    backbone = [k for k in state if _BACKBONE_NAME.search(k)]
    if len(backbone) >= MIN_BACKBONE_TENSORS:
        return
    found = f"{len(state)} tensors ({_sample(state)})" if state else "no tensors"
    raise CheckpointError(
        f"'{src}' gives {found}, {len(backbone)} of them backbone weights; expected a network's "
        f"state dict with at least {MIN_BACKBONE_TENSORS} backbone tensors (a ResNet, or a "
        "detectron2 / AdelaiDet / BoxTeacher detector). Nothing was written."
    )


def _sample(names: dict[str, torch.Tensor], count: int = 5) -> str:
    """The first ``count`` names, and how many more."""
    shown = list(names)[:count]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f", ... {more} more" if more else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="IN", help="weight file to convert")
    parser.add_argument("dst", metavar="OUT", help="checkpoint to write (.pth)")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="UNSAFE: unpickle IN with torch.load(weights_only=False), running any code it holds",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        count = convert(args.src, args.dst, args.trust_pickle)
    except (CheckpointError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1
    logger.info("Wrote %d tensors to %s in %.2f s.", count, args.dst, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
