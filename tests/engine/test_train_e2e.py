"""End to end on the built-in shapes dataset: training lowers the loss and evaluates, resuming
repeats an uninterrupted run exactly, two CPU processes train together (gloo), the command
line trains and evaluates, and every config key is read somewhere."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boxteacher.build import architecture_spec, build_model
from boxteacher.config import load_config
from boxteacher.config.defaults import _C
from boxteacher.data import register_datasets_from_config
from boxteacher.data.catalog import get_dataset_records
from boxteacher.data.split import split_coco
from boxteacher.engine import (
    Checkpointer,
    default_argument_parser,
    default_setup,
    setup_config,
)
from boxteacher.engine.hooks import HookBase
from boxteacher.engine.trainer import Trainer, build_training_data
from boxteacher.utils.env import seed_all_rng

from tiny_models import RECORDED_READS, REPO, RecordingCfgNode, leaf_keys

# End-to-end runs, on the built-in datasets under a temporary root.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shapes_datasets")]
QUICKSTART = str(REPO / "configs/quickstart/condinst_shapes.yaml")
QUICKSTART_BOXINST = str(REPO / "configs/quickstart/boxinst_shapes.yaml")
QUICKSTART_BOXTEACHER = str(REPO / "configs/quickstart/boxteacher_shapes.yaml")
QUICKSTART_BOXTEACHER_MASKRCNN = str(REPO / "configs/maskrcnn/boxteacher_maskrcnn_shapes.yaml")
SMALL_RUN = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4"]


def make_trainer(opts, config=QUICKSTART):
    seed_all_rng(0)
    return Trainer(setup_config(config, opts))


def mean_losses(trainer, name, count=10):
    values = [v for v, _ in trainer.storage.history(name).values()]
    return sum(values[:count]) / count, sum(values[-count:]) / count


def test_condinst_training_lowers_the_loss(tmp_path):
    trainer = make_trainer(
        SMALL_RUN
        + ["SOLVER.MAX_ITER", "30", "SEED", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    first, last = mean_losses(trainer, "loss_mask")
    assert last < 0.8 * first, (first, last)


def test_boxteacher_training_lowers_the_loss_evaluates_and_reads_every_config_key(
    tmp_path, restored_loggers
):
    """BoxTeacher reads every key CondInst and BoxInst read, and its own."""
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "2",
        "SOLVER.MAX_ITER",
        "40",
        "SOLVER.CLIP_GRADIENTS.ENABLED",
        "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
        "100.0",
        "MODEL.BOX_TEACHER.WITH_AVG_LOSS",
        "True",
        "MODEL.BOX_TEACHER.WARMUP_ITERS",
        "20",
        "SEED",
        "0",
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    RECORDED_READS.clear()
    cfg = RecordingCfgNode(load_config(QUICKSTART_BOXTEACHER, opts))
    cfg.freeze()
    register_datasets_from_config(cfg)  # as setup_config does
    default_setup(cfg, default_argument_parser().parse_args([]))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()

    # The pseudo-mask losses rise from 0 during their warm-up, so the total falls less than
    # the box terms (CPU threads make runs differ slightly).
    first, last = mean_losses(trainer, "total_loss")
    assert last < first, (first, last)
    first, last = mean_losses(trainer, "loss_prj")
    assert last < 0.8 * first, (first, last)
    assert set(results) == {"bbox", "segm"} and 0 <= results["segm"]["AP"] <= 100
    assert (tmp_path / "model_final.pth").is_file()
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("segm/AP" in line for line in lines) and any(
        "loss_mask_affinity" in line for line in lines
    )
    assert any("num_pseudo_masks" in line and "ema_momentum" in line for line in lines)
    assert any("param_diff" in line for line in lines) and any("loss_avg" in line for line in lines)
    assert (tmp_path / "inference/shapes_val/coco_instances_results.json").is_file()

    # The keys of the other detector and of a frozen teacher: read when one is built.
    teacher_cfg = load_config(QUICKSTART, ["MODEL.DEVICE", "cpu"])
    (tmp_path / "teacher.yaml").write_text(teacher_cfg.dump())
    torch.save(build_model(teacher_cfg).state_dict(), tmp_path / "teacher.pth")
    cfg = RecordingCfgNode(
        load_config(
            QUICKSTART_BOXTEACHER_MASKRCNN,
            [
                "MODEL.DEVICE",
                "cpu",
                "MODEL.BOX_TEACHER.TEACHER_CONFIG",
                str(tmp_path / "teacher.yaml"),
                "MODEL.BOX_TEACHER.TEACHER_WEIGHTS",
                str(tmp_path / "teacher.pth"),
            ],
        )
    )
    cfg.freeze()
    build_model(cfg)
    # The keys of semi-supervised training: read when its model and data are built.
    cfg = RecordingCfgNode(load_config(QUICKSTART_BOXTEACHER, ["MODEL.DEVICE", "cpu", *SEMI]))
    cfg.freeze()
    build_model(cfg)
    build_training_data(cfg, architecture_spec(cfg), seed=0, start_iter=0)

    unread = sorted(set(leaf_keys(_C)) - RECORDED_READS)
    assert not unread, f"config keys that no code reads: {unread}"


def test_boxteacher_with_a_mask_rcnn_student_trains_and_evaluates(tmp_path):
    trainer = make_trainer(
        SMALL_RUN + ["SOLVER.MAX_ITER", "30", "SEED", "0", "OUTPUT_DIR", str(tmp_path)],
        QUICKSTART_BOXTEACHER_MASKRCNN,
    )
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    first, last = mean_losses(trainer, "loss_prj")
    assert last < 0.8 * first, (first, last)
    assert set(results) == {"bbox", "segm"} and 0 <= results["segm"]["AP"] <= 100
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("ema_momentum" in line for line in lines)  # the EMA teacher of a Mask R-CNN
    # Its pass runs in eval mode, so only the EMA moves its BN statistics off the initial 0 / 1.
    teacher_bn = trainer.model.teacher.backbone.body.bn1
    assert (
        teacher_bn.running_mean.abs().max() > 1e-3
        and (teacher_bn.running_var - 1).abs().max() > 1e-3
    )


class RecordBatch(HookBase):
    """Keeps the batch of every step."""

    def __init__(self, batches):
        self.batches = batches

    def after_step(self):
        self.batches.append(self.trainer.last_batch)


class StopAfter(HookBase):
    """Simulates a crash after a given iteration."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt


# Semi-supervised: the validation images as unlabelled ones, used from iteration 1 on, with
# every detection of the young teacher an ignore region.
SEMI = [
    *("DATASETS.UNLABELED", "('shapes_val',)", "MODEL.BOX_TEACHER.WARMUP_ITERS", "1"),
    *("MODEL.SEMI.SCORE_HIGH", "1.0", "MODEL.SEMI.SCORE_LOW", "0.0"),
]


@pytest.mark.parametrize(
    "config, extra",
    [(QUICKSTART, []), (QUICKSTART_BOXTEACHER, []), (QUICKSTART_BOXTEACHER, SEMI)],
    ids=["condinst", "boxteacher", "semi_supervised"],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, config, extra):
    """Weights (the EMA teacher's too), optimizer, LR, RNG and data (both streams of a
    semi-supervised run) continue exactly."""
    # MAX_PROPOSALS samples positives at random: resuming must restore the RNG state too.
    opts = (
        extra
        + SMALL_RUN
        + [
            "SOLVER.MAX_ITER",
            "6",
            "SOLVER.CHECKPOINT_PERIOD",
            "3",
            "SEED",
            "-1",
            "MODEL.CONDINST.MAX_PROPOSALS",
            "4",
            "DATASETS.TEST",
            "()",
        ]
    )
    straight = make_trainer(opts + ["OUTPUT_DIR", str(tmp_path / "straight")], config)
    straight.resume_or_load(resume=False)
    straight.data_seed = 1234
    straight.train()

    interrupted = make_trainer(opts + ["OUTPUT_DIR", str(tmp_path / "resumed")], config)
    interrupted.resume_or_load(resume=False)
    interrupted.data_seed = 1234
    interrupted.register_hooks([StopAfter(3)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert (tmp_path / "resumed/model_0000002.pth").is_file()

    resumed = make_trainer(opts + ["OUTPUT_DIR", str(tmp_path / "resumed")], config)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3 and resumed.data_seed == 1234
    resumed.train()
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    if extra:  # the unlabelled stream ran, its detections all ignore regions
        ignored = [v for v, _ in straight.storage.history("num_ignore_regions").values()]
        assert max(ignored) > 0


def test_resume_from_the_checkpoint_of_the_last_iteration_writes_model_final_and_evaluates(
    tmp_path, monkeypatch
):
    """A kill after the periodic checkpoint of MAX_ITER (a multiple of CHECKPOINT_PERIOD, as in
    the COCO recipes) and before model_final; the kill also left a temporary file."""
    opts = SMALL_RUN + [
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "SEED",
        "0",
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    save = Checkpointer.save

    def killed_before_model_final(checkpointer, name, **kwargs):
        if name == "model_final":
            raise KeyboardInterrupt
        save(checkpointer, name, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", killed_before_model_final)
    killed = make_trainer(opts)
    killed.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    (tmp_path / "model_final.pth.tmp").write_bytes(b"partial")

    resumed = make_trainer(opts)
    assert not (tmp_path / "model_final.pth.tmp").exists()
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    results = resumed.train()
    assert set(results) == {"bbox", "segm"}
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    periodic = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert (
        final["iteration"] == 1 and (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    )
    assert all(torch.equal(value, final["model"][key]) for key, value in periodic["model"].items())


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_cpu_processes_train_boxteacher_then_eval_only_from_the_command_line(tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(
        "--config-file",
        QUICKSTART_BOXTEACHER,
        "--num-gpus",
        "2",
        *SMALL_RUN,
        "SOLVER.MAX_ITER",
        "4",
        "OUTPUT_DIR",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file() and (out / "log.txt.rank1").is_file()
    assert "Evaluation results for segm" in proc.stdout

    proc = run_cli(
        "--config-file",
        QUICKSTART_BOXTEACHER,
        "--eval-only",
        *SMALL_RUN,
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout
    assert (tmp_path / "eval/inference/shapes_val/coco_instances_results.json").is_file()


def test_command_line_errors_name_the_problem(tmp_path):
    proc = run_cli(
        "--config-file", QUICKSTART, "MODEL.FCOS.NUM_CLASSSES", "3", "OUTPUT_DIR", str(tmp_path)
    )
    assert proc.returncode != 0 and "MODEL.FCOS.NUM_CLASSSES" in proc.stderr
    proc = run_cli("--config-file", str(tmp_path / "missing.yaml"))
    assert proc.returncode != 0 and "missing.yaml" in proc.stderr


REAL_DATASETS = {
    "carparts": (
        18,
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        '[["front_left_door", "front_right_door"], ["back_left_door", "back_right_door"], '
        '["front_left_light", "front_right_light"], ["back_left_light", "back_right_light"], '
        '["left_mirror", "right_mirror"]]',
    ),
    "coco128": (
        80,
        "annotations/instances_train2017.json",
        "annotations/instances_train2017.json",
        "[]",
    ),
}


@pytest.mark.parametrize(
    "config",
    [QUICKSTART, QUICKSTART_BOXINST, QUICKSTART_BOXTEACHER],
    ids=["condinst", "boxinst", "boxteacher"],
)
@pytest.mark.parametrize("name", sorted(REAL_DATASETS))
def test_short_training_and_evaluation_on_real_coco_format_data(
    name, config, tmp_path, shared_data
):
    root = shared_data / name
    num_classes, train_json, val_json, flip_pairs = REAL_DATASETS[name]
    register = str(
        [
            [f"{name}_t", str(root / train_json), str(root / "images")],
            [f"{name}_v", str(root / val_json), str(root / "images")],
        ]
    )
    trainer = make_trainer(
        SMALL_RUN
        + [
            "DATASETS.REGISTER",
            register,
            "DATASETS.TRAIN",
            f"('{name}_t',)",
            "DATASETS.TEST",
            f"('{name}_v',)",
            "DATASETS.FLIP_CLASS_PAIRS",
            flip_pairs,
            "MODEL.FCOS.NUM_CLASSES",
            str(num_classes),
            "INPUT.MIN_SIZE_TRAIN",
            "(128,)",
            "INPUT.MIN_SIZE_TEST",
            "128",
            "SOLVER.MAX_ITER",
            "3",
            "MODEL.FCOS.INFERENCE_TH_TEST",
            "0.0",
            "MODEL.FCOS.POST_NMS_TOPK_TEST",
            "10",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        config,
    )
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm"}
    predictions = json.loads(
        (tmp_path / f"inference/{name}_v/coco_instances_results.json").read_text()
    )
    categories = {c["id"] for c in json.loads((root / val_json).read_text())["categories"]}
    assert predictions and {p["category_id"] for p in predictions} <= categories


def test_boxinst_trains_on_a_dataset_without_any_segmentation(tmp_path, shapes_datasets):
    """Box supervision reads boxes only: a json without "segmentation" trains."""
    get_dataset_records("shapes_train")  # generates the shapes dataset if needed
    train_json = Path(shapes_datasets) / "shapes/annotations/instances_train.json"
    coco = json.loads(train_json.read_text())
    for ann in coco["annotations"]:
        del ann["segmentation"]
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(coco))
    register = str([["boxes_only", str(boxes_only), str(Path(shapes_datasets) / "shapes/train")]])
    trainer = make_trainer(
        SMALL_RUN
        + [
            "DATASETS.REGISTER",
            register,
            "DATASETS.TRAIN",
            "('boxes_only',)",
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        QUICKSTART_BOXINST,
    )
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm"}


def test_torchrun_starts_a_two_process_training(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(REPO / "train_net.py"),
            "--config-file",
            QUICKSTART,
            *SMALL_RUN,
            "SOLVER.MAX_ITER",
            "2",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "log.txt.rank1").is_file()


@pytest.mark.parametrize(
    "labels", [[], ["MODEL.BOXINST.GT_MASKS", "present"]], ids=["boxes", "masks"]
)
def test_semi_supervised_boxteacher_trains_on_a_split_of_labelled_and_unlabelled_images(
    tmp_path, shapes_datasets, labels
):
    """The split tool's two parts by path: 30 % of the training images with boxes (or masks,
    Guided Distillation's setting: their Dice joins BoxTeacher's losses), the rest unlabelled;
    the student learns from the pseudo instances of the unlabelled ones."""
    get_dataset_records("shapes_train")  # generates the shapes dataset if needed
    train_json = Path(shapes_datasets) / "shapes/annotations/instances_train.json"
    split = split_coco(json.loads(train_json.read_text()), 0.3, seed=1)
    for name, part in (("labeled", split.labeled), ("unlabeled", split.unlabeled)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    images = str(Path(shapes_datasets) / "shapes/train")
    trainer = make_trainer(
        SMALL_RUN
        + SEMI
        + labels
        + [
            # every detection of the young teacher a pseudo instance
            *("MODEL.SEMI.SCORE_HIGH", "0.0", "MODEL.SEMI.MIN_MASK_AREA", "1"),
            *("DATASETS.REGISTER", str([["semi_t", str(tmp_path / "labeled.json"), images]])),
            *(
                "DATASETS.REGISTER_UNLABELED",
                str([["semi_u", str(tmp_path / "unlabeled.json"), images]]),
            ),
            *("DATASETS.TRAIN", "('semi_t',)", "DATASETS.UNLABELED", "('semi_u',)"),
            *("DATALOADER.UNLABELED_RATIO", "1.5", "SOLVER.MAX_ITER", "4", "SEED", "1"),
            *("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "OUTPUT_DIR", str(tmp_path / "out")),
        ],
        QUICKSTART_BOXTEACHER,
    )
    batches = []
    trainer.register_hooks([RecordBatch(batches)])
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm"}
    assert all(
        sum(x.get("unlabeled", False) for x in batch) == 6 and len(batch) == 10 for batch in batches
    )
    instances = [v for v, _ in trainer.storage.history("num_unlabeled_instances").values()]
    ignored = [v for v, _ in trainer.storage.history("num_ignore_regions").values()]
    assert len(instances) == 3 and max(instances) > 0 and max(ignored) == 0  # iterations 1-3
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert all(math.isfinite(v) for v in losses)
    if labels:  # the labelled images' masks supervise their instances
        masked = [v for v, _ in trainer.storage.history("num_gt_masks").values()]
        assert min(masked) > 0 and "loss_gt_mask" in trainer.storage.histories()


def test_guided_burn_in_keeps_the_pretrained_teacher_then_copies_the_student_and_resumes_exactly(
    tmp_path,
):
    """A teacher pre-trained on the labelled part (here: initial weights) is kept for
    BURN_IN_ITERS, then replaced by the student and averaged; a run interrupted before the copy
    resumes into the same weights."""
    torch.manual_seed(3)
    teacher = build_model(load_config(QUICKSTART_BOXINST, ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    opts = (
        SEMI
        + SMALL_RUN
        + [
            *(
                "MODEL.SEMI.TEACHER_WEIGHTS",
                str(tmp_path / "teacher.pth"),
                "MODEL.SEMI.BURN_IN_ITERS",
                "4",
            ),
            *(
                # Few positives: the backward of many is not bit-reproducible on the CPU.
                "MODEL.CONDINST.MAX_PROPOSALS",
                "4",
                "SOLVER.MAX_ITER",
                "6",
                "SOLVER.CHECKPOINT_PERIOD",
                "3",
                "SEED",
                "7",
                "DATASETS.TEST",
                "()",
            ),
        ]
    )
    straight = make_trainer(
        opts + ["OUTPUT_DIR", str(tmp_path / "straight")], QUICKSTART_BOXTEACHER
    )
    straight.resume_or_load(resume=False)
    straight.train()
    before_copy = torch.load(tmp_path / "straight/model_0000002.pth", weights_only=True)["model"]
    loaded = teacher.state_dict()
    # Its parameters; its BN statistics move, the teacher running in train mode.
    kept = [torch.equal(before_copy[f"teacher.{k}"], v) for k, v in teacher.named_parameters()]
    assert all(kept)
    final = straight.model.state_dict()
    assert not torch.equal(
        final["teacher.backbone.fpn.extra_blocks.p7.weight"],
        loaded["backbone.fpn.extra_blocks.p7.weight"],
    )
    momenta = [v for v, _ in straight.storage.history("ema_momentum").values()]
    assert momenta[:5] == [1.0, 1.0, 1.0, 1.0, 0.0]

    interrupted = make_trainer(
        opts + ["OUTPUT_DIR", str(tmp_path / "resumed")], QUICKSTART_BOXTEACHER
    )
    interrupted.resume_or_load(resume=False)
    interrupted.register_hooks([StopAfter(3)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = make_trainer(opts + ["OUTPUT_DIR", str(tmp_path / "resumed")], QUICKSTART_BOXTEACHER)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    b = resumed.model.state_dict()
    different = [k for k in final if not torch.equal(final[k], b[k])]
    assert not different, different[:5]


def test_three_stages_in_one_command_then_a_resume_keeps_the_trained_teacher(tmp_path):
    """MODEL.SEMI.TRAIN_TEACHER: stage 1 trains the teacher on the labelled images in
    OUTPUT_DIR/teacher, stage 2 keeps it for BURN_IN_ITERS while the student learns, stage 3
    averages; both networks are evaluated (EVAL_BOTH). --resume keeps the finished stage 1."""
    from boxteacher.engine.trainer import train_or_evaluate

    out = tmp_path / "out"
    opts = [
        *SMALL_RUN,
        *SEMI,
        *("MODEL.SEMI.TRAIN_TEACHER", "True", "MODEL.SEMI.BURN_IN_ITERS", "2"),
        *("MODEL.BOX_TEACHER.EVAL_BOTH", "True", "MODEL.CONDINST.MAX_PROPOSALS", "4"),
        *("SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "5"),
        *("DATASETS.TEST", "('shapes_val',)", "INPUT.MIN_SIZE_TEST", "64"),
        *("OUTPUT_DIR", str(out)),
    ]
    parser = default_argument_parser()
    results = train_or_evaluate(parser.parse_args(["--config-file", QUICKSTART_BOXTEACHER, *opts]))
    assert {"bbox", "segm", "student"} <= set(results) and set(results["student"]) == {
        "bbox",
        "segm",
    }
    assert (out / "inference/student/shapes_val").is_dir()
    log = (out / "log.txt").read_text()
    for stage in ("Stage 1: training the teacher", "Stage 2 (guided burn-in)", "Stage 3, iter"):
        assert stage in log
    teacher = torch.load(out / "teacher/model_final.pth", weights_only=True)["model"]
    during_burn_in = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    kept = "teacher.backbone.fpn.extra_blocks.p7.weight"
    assert torch.equal(during_burn_in[kept], teacher[kept])  # the stage-1 teacher, as loaded
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert "student/segm/AP" in metrics[-1] and "segm/AP" in metrics[-1]
    assert all("num_ignore_regions" in m for m in metrics if "total_loss" in m)

    stamp = (out / "teacher/model_final.pth").stat().st_mtime_ns
    resumed = ["--config-file", QUICKSTART_BOXTEACHER, "--resume", *opts]
    train_or_evaluate(parser.parse_args(resumed))
    assert (out / "teacher/model_final.pth").stat().st_mtime_ns == stamp
    assert "the teacher trained on the labelled images is there" in (out / "log.txt").read_text()
