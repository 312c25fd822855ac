"""The networks and their pieces, in plain PyTorch (no config, data or engine).

``CondInst`` is the detector (BoxInst is CondInst with the box criteria); ``BoxTeacher`` wraps a
student and an EMA teacher of any detector that follows the teacher protocol
(``TeacherProtocol``: ``forward_teacher``), such as ``TeacherView`` of a CondInst or
``MaskRCNNTeacherView`` of a ``MaskRCNN``. ``boxteacher.build_model(cfg)`` builds them from a
config; the constructors here take plain arguments.
"""

from .backbone import FPNBackbone, ResNet
from .boxteacher import BoxTeacher
from .criteria import BoxInstCriterion, DiceMaskCriterion, PseudoMaskCriterion
from .fcos import FCOS
from .mask_rcnn import MaskRCNN, MaskRCNNTeacherView
from .meta_arch import CondInst
from .pseudo_labels import PseudoLabeler
from .supervision import LossWeights, MaskSupervision, SupervisionKind
from .teacher import TeacherPass, TeacherProtocol, TeacherView

__all__ = [
    "BoxInstCriterion",
    "BoxTeacher",
    "CondInst",
    "DiceMaskCriterion",
    "FCOS",
    "FPNBackbone",
    "LossWeights",
    "MaskRCNN",
    "MaskRCNNTeacherView",
    "MaskSupervision",
    "PseudoLabeler",
    "PseudoMaskCriterion",
    "ResNet",
    "SupervisionKind",
    "TeacherPass",
    "TeacherProtocol",
    "TeacherView",
]
