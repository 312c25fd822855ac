"""Convert a weight file to this project's checkpoint format, once.

    python tools/convert_weights.py IN OUT [--trust-pickle]

IN is anything ``MODEL.WEIGHTS`` reads (detectron2 / AdelaiDet / BoxTeacher checkpoints, Caffe2
or detectron2 ``.pkl`` files, torchvision ``.pth`` files, this project's checkpoints); OUT is
``{"model": state dict}`` in this project's parameter names, readable with
``torch.load(weights_only=True)``. Only model weights are kept (no optimizer state).

``--trust-pickle`` reads IN with ``torch.load(weights_only=False)``, which executes any code
pickled in the file: use it only for files from a source you trust, e.g. PyTorch's legacy
``.tar`` format or checkpoints holding pickled modules. The output is safe to load afterwards.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from boxteacher.engine.checkpoint import atomic_open
from boxteacher.engine.weight_files import load_trusted_checkpoint_file, read_model_weights

logger = logging.getLogger("convert_weights")


def convert(src: str, dst: str, trust_pickle: bool = False) -> int:
    """Write the model weights of ``src`` to ``dst`` atomically; returns the number of tensors."""
    checkpoint = load_trusted_checkpoint_file(src) if trust_pickle else read_model_weights(src)
    state = {k: v for k, v in checkpoint["model"].items() if isinstance(v, torch.Tensor)}
    dropped = sorted(set(checkpoint["model"]) - set(state))
    if dropped:
        logger.warning("Entries that are not tensors are left out: %s", dropped)
    with atomic_open(dst) as f:
        torch.save({"model": state, "__author__": f"converted from {src}"}, f)
    return len(state)


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
    count = convert(args.src, args.dst, args.trust_pickle)
    logger.info("Wrote %d tensors to %s in %.2f s.", count, args.dst, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
