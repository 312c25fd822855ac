"""Mask AP over seeds (``boxteacher.evaluation.seed_summary``), the table of
``tools/benchmark_accuracy.py``."""

from boxteacher.evaluation.seed_summary import (
    seed_table,
    semi_supervised_table,
    summarise_seeds,
)


def test_seed_summary_tables_mean_spread_and_ratio_to_the_same_detector():
    methods = {
        "maskrcnn": ("Mask R-CNN", "masks", "maskrcnn"),
        "boxteacher_maskrcnn": ("BoxTeacher, Mask R-CNN student", "boxes", "maskrcnn"),
        "boxinst": ("BoxInst", "boxes", "condinst"),
    }
    runs = [
        {
            "key": key,
            "method": methods[key][0],
            "supervision": methods[key][1],
            "reference": methods[key][2],
            "seed": seed,
            "AP": ap,
            "AP50": 2 * ap,
            "AP75": ap / 2,
            "box_AP": ap + 1,
            "wall_minutes": 1.0,
        }
        for key, seed, ap in [
            ("maskrcnn", 1, 40.0),
            ("maskrcnn", 2, 42.0),
            ("boxteacher_maskrcnn", 1, 30.0),
            ("boxteacher_maskrcnn", 2, 33.0),
            ("boxinst", 1, 10.0),
            ("boxinst", 2, 12.0),
        ]
    ]
    rows = summarise_seeds(runs)
    assert [(r["key"], r["AP"], r["AP_std"], r["seed_APs"]) for r in rows] == [
        ("maskrcnn", 41.0, 1.4, [40.0, 42.0]),
        ("boxteacher_maskrcnn", 31.5, 2.1, [30.0, 33.0]),
        ("boxinst", 11.0, 1.4, [10.0, 12.0]),
    ]
    lines = seed_table(rows).splitlines()
    assert (
        "| 31.5 ± 2.1 " in lines[3]
        and "| 30.0 / 33.0 " in lines[3]
        and f"| {31.5 / 41.0:.2f} " in lines[3]
    )
    assert (
        "| 1.00 " in lines[2] and "| - " in lines[4]
    )  # BoxInst's reference, CondInst, did not run
    one_seed = summarise_seeds(runs[:1])
    assert one_seed[0]["AP_std"] is None and "| 40.0 " in seed_table(one_seed).splitlines()[2]


def _runs(aps: dict[str, list[float]]) -> list[dict]:
    return [
        {
            "key": key,
            "method": "BoxTeacher",
            "supervision": "boxes",
            "reference": "condinst",
            "seed": seed,
            "AP": ap,
            "AP50": ap,
            "AP75": ap,
            "box_AP": ap,
            "wall_minutes": 1.0,
        }
        for key, values in aps.items()
        for seed, ap in enumerate(values, 1)
    ]


def test_semi_supervised_table_gives_the_gain_and_the_share_of_the_gap_closed():
    rows = summarise_seeds(
        _runs(
            {
                "boxteacher": [56.0, 58.0],
                "boxteacher_30pct": [50.0, 52.0],
                "semi_boxteacher_30pct": [53.0, 55.0],
                "boxteacher_10pct": [30.0, 30.0],
                "semi_boxteacher_10pct": [29.0, 29.0],
            }
        )
    )
    lines = semi_supervised_table(rows).splitlines()
    assert len(lines) == 4
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == [
        "BoxTeacher, 30 % labelled",
        "51.0 ± 1.4",
        "54.0 ± 1.4",
        "57.0 ± 1.4",
        "+3.0",
        "0.50",
    ]
    assert "| -1.0 " in lines[3] and "| -0.04 " in lines[3]


def test_semi_supervised_table_without_its_rows():
    assert semi_supervised_table(summarise_seeds(_runs({"boxteacher": [50.0]}))) == ""
    only_semi = summarise_seeds(_runs({"semi_boxteacher_30pct": [50.0]}))
    assert semi_supervised_table(only_semi) == ""
    without_full = summarise_seeds(
        _runs({"boxteacher_30pct": [40.0], "semi_boxteacher_30pct": [45.0]})
    )
    row = semi_supervised_table(without_full).splitlines()[2]
    assert "| 40.0 " in row and "| 45.0 " in row and row.count("| - ") == 2
