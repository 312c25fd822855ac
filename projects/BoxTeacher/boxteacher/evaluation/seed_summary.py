"""Mask AP over seeds: one row per method with the means, the spread and every seed's AP, and
the markdown table of ``tools/benchmark_accuracy.py``."""

from __future__ import annotations

import statistics

from tabulate import tabulate

__all__ = ["seed_table", "semi_supervised_table", "summarise_seeds"]

_MEANS = ("AP", "AP50", "AP75", "box_AP", "wall_minutes")


def summarise_seeds(runs: list[dict]) -> list[dict]:
    """One row per method (``key``) of ``runs``, in their order: the means over its seeds of
    ``AP``, ``AP50``, ``AP75``, ``box_AP`` and ``wall_minutes`` (rounded to 0.1), ``AP_std`` the
    standard deviation of mask AP (None for one seed), ``seed_APs`` and ``seeds``; ``method``,
    ``supervision`` and ``reference`` (the key of the same detector trained with masks) are
    those of its first run."""
    rows = []
    for key in dict.fromkeys(r["key"] for r in runs):
        mine = [r for r in runs if r["key"] == key]
        mean = {name: round(statistics.fmean(r[name] for r in mine), 1) for name in _MEANS}
        spread = round(statistics.stdev(r["AP"] for r in mine), 1) if len(mine) > 1 else None
        first = mine[0]
        rows.append(
            {
                "key": key,
                "method": first["method"],
                "supervision": first["supervision"],
                "reference": first["reference"],
                **mean,
                "AP_std": spread,
                "seed_APs": [r["AP"] for r in mine],
                "seeds": [r["seed"] for r in mine],
            }
        )
    return rows


def seed_table(rows: list[dict]) -> str:
    """The markdown table of ``summarise_seeds``'s rows; the ratio divides by the mask AP of the
    row of ``reference`` ("-" when that method did not run)."""
    by_key = {r["key"]: r for r in rows}
    table = []
    for r in rows:
        reference = by_key.get(r["reference"])
        ratio = f"{r['AP'] / reference['AP']:.2f}" if reference and reference["AP"] > 0 else "-"
        seeds = " / ".join(str(ap) for ap in r["seed_APs"])
        ap = _ap(r)
        table.append(
            [
                r["method"],
                r["supervision"],
                ap,
                seeds,
                r["AP50"],
                r["AP75"],
                r["box_AP"],
                ratio,
                r["wall_minutes"],
            ]
        )
    headers = [
        "method",
        "supervision",
        "mask AP (mean ± sd)",
        "mask AP per seed",
        "AP50",
        "AP75",
        "box AP",
        "mask AP / same detector with masks",
        "minutes per run",
    ]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def semi_supervised_table(rows: list[dict]) -> str:
    """Per semi-supervised row (key ``semi_<method>_<tag>``) whose labelled-only row
    (``<method>_<tag>``) ran: the mask AP (mean ± sd) labelled-only, semi-supervised and with all
    images labelled (``<method>``, "-" when it did not run), the gain and the share of the gap to
    all images labelled that it closes. An empty string without such rows."""
    by_key = {r["key"]: r for r in rows}
    table = []
    for r in rows:
        if not r["key"].startswith("semi_"):
            continue
        alone = by_key.get(r["key"].removeprefix("semi_"))
        if alone is None:
            continue
        method, _, tag = alone["key"].rpartition("_")
        full = by_key.get(method)
        gain = r["AP"] - alone["AP"]
        gap = full["AP"] - alone["AP"] if full else 0.0
        table.append(
            [
                f"{r['method']}, {tag.removesuffix('pct')} % labelled",
                _ap(alone),
                _ap(r),
                _ap(full) if full else "-",
                f"{gain:+.1f}",
                f"{gain / gap:.2f}" if gap > 0 else "-",
            ]
        )
    if not table:
        return ""
    headers = [
        "setting",
        "labelled part alone",
        "+ the rest unlabelled",
        "all labelled",
        "gain",
        "share of the gap closed",
    ]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def _ap(row: dict) -> str:
    return str(row["AP"]) if row["AP_std"] is None else f"{row['AP']} ± {row['AP_std']}"
