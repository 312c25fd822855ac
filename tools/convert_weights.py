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

import logging
import sys
import time

from boxteacher.engine import default_argument_parser, setup_tool_logging
from boxteacher.engine.weight_files import CheckpointError, convert_weight_file

logger = logging.getLogger("boxteacher.convert_weights")


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument("src", metavar="IN", help="weight file to convert")
    parser.add_argument("dst", metavar="OUT", help="checkpoint to write (.pth)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="UNSAFE: unpickle IN with torch.load(weights_only=False), running any code it holds",
    )
    args = parser.parse_args(argv)
    setup_tool_logging()
    start = time.perf_counter()
    try:
        count = convert_weight_file(args.src, args.dst, args.trust_pickle)
    except (CheckpointError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1
    logger.info("Wrote %d tensors to %s in %.2f s.", count, args.dst, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
