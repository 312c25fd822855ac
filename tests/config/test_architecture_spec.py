"""Architectures declare their data needs (``ArchitectureSpec``) when they are registered: the
specs of the built-in ones, a toy architecture trained through ``train_net.py`` with nothing but
its registration, and a check that no code outside ``build.py`` asks for an architecture by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from boxteacher import build
from boxteacher.build import (
    META_ARCH_REGISTRY,
    architecture_spec,
    build_model,
    register_architecture,
)
from boxteacher.config import ArchitectureSpec, load_config
from boxteacher.config.supervision import gt_mask_mode
from boxteacher.data import DatasetMapper
from boxteacher.engine import default_argument_parser, hooks
from boxteacher.engine.trainer import Trainer, train_or_evaluate

from tiny_models import REPO, tiny_cfg

PACKAGE = REPO / "projects" / "BoxTeacher" / "boxteacher"

BOXTEACHER = ["MODEL.META_ARCHITECTURE", "BoxTeacher", "MODEL.BOXINST.ENABLED", "True"]


# ---------------------------------------------------------------------------------------------
# The specs of the built-in architectures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], ArchitectureSpec()),
        (["MODEL.BOXINST.ENABLED", "True"], ArchitectureSpec(box_supervised=True)),
        (
            BOXTEACHER,
            ArchitectureSpec(
                box_supervised=True, student_view=True, teacher_student=True, unlabeled_images=True
            ),
        ),
        (
            [*BOXTEACHER, "MODEL.BOX_TEACHER.STUDENT", "MaskRCNN"],
            ArchitectureSpec(box_supervised=True, student_view=True, teacher_student=True),
        ),
    ],
    ids=["condinst", "boxinst", "boxteacher", "boxteacher_maskrcnn"],
)
def test_builtin_architectures_declare_their_needs(overrides, expected):
    assert architecture_spec(tiny_cfg(*overrides)) == expected


def test_the_default_spec_is_one_mask_supervised_network():
    assert ArchitectureSpec() == ArchitectureSpec(
        box_supervised=False, student_view=False, teacher_student=False, unlabeled_images=False
    )
    with pytest.raises(AttributeError):
        ArchitectureSpec().box_supervised = True  # frozen


def test_boxteacher_without_box_supervision_is_an_error_naming_the_key():
    cfg = tiny_cfg("MODEL.META_ARCHITECTURE", "BoxTeacher", "MODEL.BOXINST.ENABLED", "False")
    for function in (architecture_spec, build_model):
        with pytest.raises(ValueError, match="MODEL.BOXINST.ENABLED") as error:
            function(cfg)
        assert "BoxTeacher" in str(error.value) and "boxes" in str(error.value)


def test_unknown_architecture_is_a_key_error_naming_the_key():
    cfg = tiny_cfg("MODEL.META_ARCHITECTURE", "NoSuchNet")
    for function in (architecture_spec, build_model):
        with pytest.raises(KeyError, match="MODEL.META_ARCHITECTURE 'NoSuchNet'"):
            function(cfg)


def test_mixed_supervision_needs_a_box_supervised_spec():
    cfg = tiny_cfg("MODEL.BOXINST.GT_MASKS", "present")
    assert gt_mask_mode(cfg, ArchitectureSpec(box_supervised=True)) == "present"
    with pytest.raises(ValueError, match="MODEL.BOXINST.GT_MASKS") as error:
        gt_mask_mode(cfg, ArchitectureSpec())
    assert "box-supervised architecture" in str(error.value) and "META_ARCHITECTURE" not in str(
        error.value
    )


def test_a_training_mapper_follows_the_spec():
    cfg = tiny_cfg("DATASETS.TRAIN", "()")
    assert DatasetMapper.from_config(cfg, True, spec=ArchitectureSpec()).with_masks
    boxes = DatasetMapper.from_config(cfg, True, spec=ArchitectureSpec(box_supervised=True))
    assert not boxes.with_masks and boxes.student_aug == "none"
    two_views = DatasetMapper.from_config(
        cfg, True, spec=ArchitectureSpec(box_supervised=True, student_view=True)
    )
    assert two_views.student_aug == cfg.INPUT.AUG_TYPE != "none"
    with pytest.raises(ValueError, match="spec"):
        DatasetMapper.from_config(cfg, True)
    assert DatasetMapper.from_config(cfg, False).student_aug == "none"  # test time: no spec needed


@pytest.mark.parametrize(
    "config, ema", [("condinst", False), ("boxinst", False), ("boxteacher", True)]
)
def test_the_trainer_keeps_a_teacher_only_for_a_teacher_student_spec(config, ema, shapes_datasets):
    cfg = load_config(
        str(REPO / f"configs/quickstart/{config}_shapes.yaml"), ["MODEL.DEVICE", "cpu"]
    )
    trainer = Trainer(cfg)
    assert trainer.spec == architecture_spec(cfg)
    assert any(isinstance(hook, hooks.EMAHook) for hook in trainer.hooks) == ema


# ---------------------------------------------------------------------------------------------
# A toy architecture: registered with its spec, trained by train_net.py, nothing else changed
# ---------------------------------------------------------------------------------------------
TOY_SPEC = ArchitectureSpec(box_supervised=True, student_view=True)


class ToyBoxNet(nn.Module):
    """One parameter; training checks that the batch holds what ``TOY_SPEC`` asks for and
    returns one loss connected to the parameter; inference returns one whole-image detection
    per image in the data contract of ``modeling/meta_arch.py``."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(()))
        self.training_batches: list[list[dict]] = []

    def forward(self, batched_inputs: list[dict], iteration: int | None = None):
        if self.training:
            for x in batched_inputs:
                assert x["image"].dtype == torch.uint8 and x["image"].dim() == 3
                assert x["aug_image"].shape == x["image"].shape  # student_view
                assert set(x["instances"]) == {"boxes", "labels"}  # box_supervised: no masks
            self.training_batches.append(batched_inputs)
            return {"loss_toy": (self.weight - 1.0) ** 2}
        return [self._whole_image(x["height"], x["width"]) for x in batched_inputs]

    def _whole_image(self, height: int, width: int) -> dict:
        device = self.weight.device
        return {
            "instances": {
                "boxes": torch.tensor([[0.0, 0.0, width, height]], device=device),
                "scores": torch.ones(1, device=device),
                "labels": torch.zeros(1, dtype=torch.int64, device=device),
                "masks": torch.ones((1, height, width), dtype=torch.bool, device=device),
            }
        }


@pytest.fixture
def toy_architecture():
    """``ToyBoxNet`` registered as ``MODEL.META_ARCHITECTURE ToyBoxArchitecture`` (with
    ``TOY_SPEC``) for the test, unregistered after it; yields the list of the built models."""
    built: list[ToyBoxNet] = []

    def ToyBoxArchitecture(cfg):  # noqa: N802 (registered under its config name)
        built.append(ToyBoxNet(cfg.MODEL.FCOS.NUM_CLASSES))
        return built[-1]

    register_architecture(TOY_SPEC)(ToyBoxArchitecture)
    try:
        yield built
    finally:
        META_ARCH_REGISTRY._obj_map.pop("ToyBoxArchitecture")
        build._ARCHITECTURE_SPECS.pop("ToyBoxArchitecture")


@pytest.mark.slow
def test_a_registered_toy_architecture_trains_one_step_with_train_net(
    toy_architecture, shapes_datasets, restored_loggers, tmp_path
):
    config = tmp_path / "toy.yaml"
    config.write_text("MODEL:\n  META_ARCHITECTURE: ToyBoxArchitecture\n")
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(config),
            "MODEL.DEVICE",
            "cpu",
            "MODEL.FCOS.NUM_CLASSES",
            "3",
            "DATASETS.TRAIN",
            "('shapes_train',)",
            "DATASETS.TEST",
            "('shapes_val',)",
            "DATALOADER.NUM_WORKERS",
            "0",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "1",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "VIS_PERIOD",
            "1",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
    )
    assert architecture_spec(tiny_cfg("MODEL.META_ARCHITECTURE", "ToyBoxArchitecture")) == TOY_SPEC
    results = train_or_evaluate(args)

    model = toy_architecture[-1]
    assert len(model.training_batches) == 1 and len(model.training_batches[0]) == 2
    assert model.weight.item() > 0  # the optimizer stepped on the loss
    assert set(results) == {"bbox", "segm"}  # inference followed the data contract
    assert (tmp_path / "out/model_final.pth").is_file()
    assert (tmp_path / "out/vis/iter_0000000.png").is_file()  # a one-network picture


def test_a_builder_registered_detectron2_style_gets_the_default_spec():
    def PlainArchitecture(cfg):  # noqa: N802
        return ToyBoxNet(cfg.MODEL.FCOS.NUM_CLASSES)

    META_ARCH_REGISTRY.register(PlainArchitecture)
    try:
        assert (
            architecture_spec(tiny_cfg("MODEL.META_ARCHITECTURE", "PlainArchitecture"))
            == ArchitectureSpec()
        )
    finally:
        META_ARCH_REGISTRY._obj_map.pop("PlainArchitecture")


# ---------------------------------------------------------------------------------------------
# No architecture is asked for by name outside build.py
# ---------------------------------------------------------------------------------------------
# The names a config asks for an architecture by (MODEL.META_ARCHITECTURE values), and the classes
# of the built-in models. Display names ("BoxInst" in the benchmark tables) are not checked.
REGISTERED_NAMES = {name for name, _ in META_ARCH_REGISTRY}
MODEL_CLASSES = {"CondInst", "BoxInst", "BoxTeacher", "PseudoMaskBoxInst"}
NETWORK_ATTRIBUTES = {"teacher", "student"}


def _names_in(node: ast.AST) -> set[str]:
    """Identifiers, attribute names and string constants anywhere in ``node``."""
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Attribute):
            names.add(child.attr)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            names.add(child.value)
    return names


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def architecture_checks_by_name(source: str) -> list[int]:
    """Lines of ``source`` that ask for an architecture by name: a comparison (``==``, ``!=``,
    ``in``, ``is``) involving ``META_ARCHITECTURE`` or a registered architecture's name, an
    ``isinstance``/``issubclass`` against a model class, and a probe for a teacher or student
    network (``hasattr(m, "teacher")``, ``getattr(m, "student", default)``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_in(o) & ({"META_ARCHITECTURE"} | REGISTERED_NAMES) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, args = node.func.id, node.args
            if (
                name in ("isinstance", "issubclass")
                and len(args) == 2
                and _names_in(args[1]) & MODEL_CLASSES
            ):
                lines.append(node.lineno)
            probe = name == "hasattr" or (name == "getattr" and len(args) == 3)
            if probe and len(args) >= 2 and _string(args[1]) in NETWORK_ATTRIBUTES:
                lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize(
    "source",
    [
        'if cfg.MODEL.META_ARCHITECTURE == "BoxTeacher":\n    pass',
        'x = cfg.MODEL.META_ARCHITECTURE != "CondInst"',
        'x = cfg.MODEL.META_ARCHITECTURE in ("A", "B")',
        'name = cfg.MODEL.META_ARCHITECTURE\nif name == "BoxTeacher":\n    pass',
        'x = type(model).__name__ == "CondInst"',
        "x = isinstance(model, BoxInst)",
        "x = isinstance(model, BoxTeacher)",
        "x = isinstance(model, (meta_arch.CondInst, nn.Module))",
        'x = hasattr(unwrap_model(model), "teacher")',
        'network = getattr(model, "student", model)',
    ],
)
def test_the_checker_finds_a_planted_check_by_name(source):
    assert architecture_checks_by_name(source), source


def test_the_checker_lets_specs_and_plain_attributes_pass():
    source = (
        "if spec.teacher_student:\n    network = model.teacher\n"
        'cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "BoxTeacher"])\n'
        'x = isinstance(model, nn.Module)\nprefix = getattr(model, "single_network_prefix", "")\n'
        'reference = next(r for r in results if r["model"] == "BoxInst")\n'
    )
    assert architecture_checks_by_name(source) == []


def _checked_files() -> list[Path]:
    package = [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "build.py"]
    return package + [REPO / "train_net.py"] + sorted((REPO / "tools").glob("*.py"))


def test_no_code_outside_build_py_asks_for_an_architecture_by_name():
    offending = [
        f"{path.relative_to(REPO)}:{line}"
        for path in _checked_files()
        for line in architecture_checks_by_name(path.read_text())
    ]
    assert not offending, f"read architecture_spec(cfg) instead: {offending}"
