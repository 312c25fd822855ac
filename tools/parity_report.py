"""Compare this implementation with the official BoxTeacher / AdelaiDet outputs recorded in the
parity fixtures, quantity by quantity, and print the largest differences.

    python tools/parity_report.py [--fixtures DIR]

DIR (default: ``$BOXTEACHER_FIXTURES``, else ``../shared/fixtures`` next to the repository)
holds one folder per fixture (``config.yaml``, ``model_final_fp16.pth``, ``inputs.pt``,
``expected.pt``; layout in the fixtures' README). Every folder is run. For each quantity the
table shows the largest difference over images, levels and detections and the tolerance of the
fixtures' README: absolute for tensors, relative for losses and gradient norms, the fraction of
disagreeing pixels for binary masks, and ``exact`` for integer outputs (detections are matched
by FCOS level, location and class). The exit status is 1 if a quantity is out of tolerance.
``tests/test_parity_official.py`` asserts the same comparisons.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from boxteacher.engine import default_argument_parser, setup_tool_logging
from boxteacher.evaluation.parity import compare_fixture, format_table
from boxteacher.evaluation.parity_fixtures import Fixture, fixture_folders, fixtures_root

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("boxteacher.parity_report")


def main(argv: list[str] | None = None) -> int:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument(
        "--fixtures",
        type=Path,
        default=fixtures_root(REPO.parent / "shared" / "fixtures"),
        help="folder of fixture folders",
    )
    args = parser.parse_args(argv)
    setup_tool_logging(logging.WARNING)
    folders = fixture_folders(args.fixtures)
    if not folders:
        logger.error("No fixture folder (with expected.pt) in %s.", args.fixtures)
        return 1
    torch.set_num_threads(2)
    failed = False
    for folder in folders:
        rows = compare_fixture(Fixture.load(folder, REPO / "configs" / "Base-BoxTeacher.yaml"))
        print(f"\n## {folder.name}\n\n{format_table(rows)}")
        failed |= not all(r.ok for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
