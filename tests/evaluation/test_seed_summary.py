"""Mask AP over seeds (``boxteacher.evaluation.seed_summary``), the table of
``tools/benchmark_accuracy.py``."""

from boxteacher.evaluation.seed_summary import seed_table, summarise_seeds


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
