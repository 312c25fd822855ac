"""BoxTeacher: box-supervised instance segmentation (CVPR 2023) and the CondInst / BoxInst family."""

__version__ = "0.1.0"
