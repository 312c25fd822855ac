"""What an architecture needs from the data and the engine, declared when it is registered.

Every ``MODEL.META_ARCHITECTURE`` registers an ``ArchitectureSpec`` with its builder
(``boxteacher.build.register_architecture``); the data mapper, the config checks, the trainer,
the training pictures and the tools read the spec (``boxteacher.build.architecture_spec(cfg)``)
instead of asking for an architecture by name. This module imports no model, so that every layer
(``data/`` included) may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchitectureSpec"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """The data and training needs of an architecture. The default is a single mask-supervised
    network (CondInst). New needs (unlabelled images, points, ...) are new fields whose default is
    what the existing architectures do, so that a spec without them keeps its meaning.

    Attributes:
        box_supervised: the model learns from boxes. The mapper loads no annotation masks, except
            in a mixed mode of ``MODEL.BOXINST.GT_MASKS`` ("present", "fraction"), which only a
            box-supervised architecture accepts.
        student_view: the model trains on a second, colour-perturbed view of each image: the
            mapper adds ``aug_image`` (``INPUT.AUG_TYPE``; with ``INPUT.AUG_EXTRA False`` the
            perturbed view replaces ``image`` instead).
        teacher_student: the model holds ``teacher`` and ``student`` networks of one architecture
            and labels a batch with ``pseudo_label(batch)`` (``modeling/boxteacher.py``): the
            trainer adds the ``EMAHook`` (the teacher is the moving average of the student), the
            training pictures show the student's predictions and the pseudo labels (see
            ``engine/visualization.py``), and the tools analyse the student.
        ema_teacher: with ``teacher_student``, the teacher is the moving average of the student
            (the trainer adds the ``EMAHook``); False: a frozen teacher, possibly of another
            architecture, loaded from a checkpoint.
        unlabeled_images: the model also learns from unlabelled images (semi-supervised,
            ``DATASETS.UNLABELED``): the trainer adds them to every batch, marked
            ``"unlabeled"`` (``data.build.build_semi_supervised_loader``).
    """

    box_supervised: bool = False
    student_view: bool = False
    teacher_student: bool = False
    ema_teacher: bool = True
    unlabeled_images: bool = False
