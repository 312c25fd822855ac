#!/usr/bin/env python
"""Plot the training curves of a run from its ``metrics.json`` (PNG files, matplotlib).

    python tools/plot_metrics.py output/quickstart_boxteacher
    python tools/plot_metrics.py output/run --output plots/ --keys time data_time "segm/AP*"

``metrics.json`` holds one JSON object per logged iteration (``{"iteration": t, name: value,
...}``, see ``engine.events.JSONWriter``). Written into ``OUTPUT_DIR/plots`` by default:

* ``losses.png``: every ``loss_*`` and ``total_loss``;
* ``lr.png``: the learning rate;
* ``eval_ap.png``: AP, AP50 and AP75 of every evaluated task (``bbox``, ``segm``), if any;
* ``boxteacher.png``: ``num_pseudo_masks``, ``ema_momentum``, ``param_diff``, if present.

With ``--keys`` (names or shell-style patterns) only ``selected_keys.png`` is written, one panel
per matching scalar. A resumed or restarted run appends to the same file: its records replace
the earlier ones from the iteration it starts at. Malformed lines are skipped with a warning.
"""

from __future__ import annotations

import os

from boxteacher.engine import default_argument_parser, setup_tool_logging
from boxteacher.utils.training_curves import MetricsError, read_metrics, write_plots


def main() -> None:
    parser = default_argument_parser(
        description=__doc__, config="none", overrides=False, training=False
    )
    parser.add_argument("output_dir", help="the OUTPUT_DIR of a training run (holds metrics.json)")
    parser.add_argument("--output", help="folder of the plots (default: OUTPUT_DIR/plots)")
    parser.add_argument(
        "--keys", nargs="+", metavar="KEY", help="plot only these scalars (names or patterns)"
    )
    args = parser.parse_args()
    setup_tool_logging()

    try:
        records = read_metrics(os.path.join(args.output_dir, "metrics.json"))
        paths = write_plots(
            records, args.output or os.path.join(args.output_dir, "plots"), args.keys
        )
    except MetricsError as e:
        parser.exit(2, f"error: {e}\n")
    if not paths:
        parser.exit(
            2, "error: nothing to plot (no losses, lr, evaluation or BoxTeacher scalars).\n"
        )
    print("\n".join(paths))


if __name__ == "__main__":
    main()
