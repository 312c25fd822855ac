"""Default configuration, with detectron2 / AdelaiDet key names.

Every key here is read somewhere in the project (``tests/test_config.py`` checks it), and a
key that is not here is an error when it appears in a YAML file or on the command line.
Values are those of detectron2 and AdelaiDet unless a comment says otherwise. The allowed range
of every numeric key is in ``ranges.py``, checked whenever a file or overrides are merged.
"""

from fvcore.common.config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
_C.MODEL = CN()
# Registered meta-architecture to build ("CondInst").
_C.MODEL.META_ARCHITECTURE = "CondInst"
# "cpu", "cuda", "cuda:N", or "auto" (CUDA when available, else CPU). detectron2 defaults to
# "cuda"; "auto" lets the same config run on a laptop and on a GPU server.
_C.MODEL.DEVICE = "auto"
# Checkpoint or pre-trained weights to load before training / for evaluation ("" = none).
_C.MODEL.WEIGHTS = ""
# Per-channel normalisation in the channel order of INPUT.FORMAT (MSRA / Caffe2 convention).
_C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
_C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

_C.MODEL.BACKBONE = CN()
# Registered backbone builder.
_C.MODEL.BACKBONE.NAME = "build_fcos_resnet_fpn_backbone"
# Freeze the first N stages of the backbone: 0 = nothing, 1 = stem, 2 = stem and res2, ...
_C.MODEL.BACKBONE.FREEZE_AT = 2

_C.MODEL.RESNETS = CN()
# 18, 34, 50 or 101.
_C.MODEL.RESNETS.DEPTH = 50
# Stages whose outputs feed the FPN.
_C.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
# Normalisation of the backbone: "FrozenBN", "BN", "SyncBN" or "GN" (32 groups).
_C.MODEL.RESNETS.NORM = "FrozenBN"
# Bottleneck groups and width per group (ResNeXt style; 1 and 64 for plain ResNet).
_C.MODEL.RESNETS.NUM_GROUPS = 1
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# True: the stride-2 of a bottleneck sits in its first 1x1 conv (MSRA / Caffe2 weights);
# False: in the 3x3 conv (torchvision weights).
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True
# Output channels of the stem and of res2 (doubling per stage after that). detectron2 insists on
# 64 for R-18/34; any width works here, which makes tiny models for quick experiments.
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
# Deformable 3x3 convolutions (torchvision's DeformConv2d) in the bottlenecks of res2..res5.
_C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]
# Modulated (DCNv2) instead of plain (DCNv1) deformable convolutions.
_C.MODEL.RESNETS.DEFORM_MODULATED = False
# Groups of offsets of the deformable convolutions.
_C.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1
# Initialisation of the ResNet's convolutions when no weights overwrite them (training from
# scratch): "msra" = detectron2's (c2_msra_fill: N(0, 2 / fan_out), the release's behaviour);
# "pytorch" = PyTorch's default of nn.Conv2d (U(+-1 / sqrt(fan_in))). Norms start at weight 1,
# bias 0 either way. FPN and heads are initialised as in the release regardless of this key.
_C.MODEL.RESNETS.INIT = "msra"

_C.MODEL.FPN = CN()
_C.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
_C.MODEL.FPN.OUT_CHANNELS = 256
# Normalisation after FPN convs: "" (none, the recipes), "GN" or "BN".
_C.MODEL.FPN.NORM = ""

# ---------------------------------------------------------------------------------------
# FCOS (AdelaiDet)
# ---------------------------------------------------------------------------------------
_C.MODEL.FCOS = CN()
# Number of foreground classes.
_C.MODEL.FCOS.NUM_CLASSES = 80
_C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
_C.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 128]
# Initial foreground probability of the classifier (sets the bias of cls_logits).
_C.MODEL.FCOS.PRIOR_PROB = 0.01
# Inference: score threshold, top-k per level before NMS, NMS IoU, detections per image.
_C.MODEL.FCOS.INFERENCE_TH_TEST = 0.05
_C.MODEL.FCOS.PRE_NMS_TOPK_TEST = 1000
_C.MODEL.FCOS.NMS_TH = 0.6
_C.MODEL.FCOS.POST_NMS_TOPK_TEST = 100
# Number of extra FPN levels above the backbone outputs (P6, P7).
_C.MODEL.FCOS.TOP_LEVELS = 2
# Normalisation in the head towers: "GN" or "none".
_C.MODEL.FCOS.NORM = "GN"
# Learnable per-level scale of the box regression.
_C.MODEL.FCOS.USE_SCALE = True
# Multiply the class probability by the centerness before the score threshold.
_C.MODEL.FCOS.THRESH_WITH_CTR = False
# Focal loss.
_C.MODEL.FCOS.LOSS_ALPHA = 0.25
_C.MODEL.FCOS.LOSS_GAMMA = 2.0
# Object-size boundaries between consecutive levels.
_C.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128, 256, 512]
# Convolutions in the classification and box towers.
_C.MODEL.FCOS.NUM_CLS_CONVS = 4
_C.MODEL.FCOS.NUM_BOX_CONVS = 4
# Centre sampling: positives only within POS_RADIUS strides of the object centre.
_C.MODEL.FCOS.CENTER_SAMPLE = True
_C.MODEL.FCOS.POS_RADIUS = 1.5
# Box regression loss: "giou" or "iou".
_C.MODEL.FCOS.LOC_LOSS_TYPE = "giou"

# ---------------------------------------------------------------------------------------
# CondInst (AdelaiDet)
# ---------------------------------------------------------------------------------------
_C.MODEL.CONDINST = CN()
# Stride of the predicted instance masks relative to the input image.
_C.MODEL.CONDINST.MASK_OUT_STRIDE = 4
# If >= 0: at most this many positives per GPU (random) are given to the mask head in training.
_C.MODEL.CONDINST.MAX_PROPOSALS = -1
# If >= 0: per image, about this many positives (the best-scoring ones of every object).
_C.MODEL.CONDINST.TOPK_PROPOSALS_PER_IM = -1
# Threshold on the mask probability at inference.
_C.MODEL.CONDINST.MASK_THRESHOLD = 0.5

_C.MODEL.CONDINST.MASK_HEAD = CN()
# Channels and layers of the dynamic (per-instance) mask head.
_C.MODEL.CONDINST.MASK_HEAD.CHANNELS = 8
_C.MODEL.CONDINST.MASK_HEAD.NUM_LAYERS = 3
# Do not feed relative coordinates to the dynamic mask head.
_C.MODEL.CONDINST.MASK_HEAD.DISABLE_REL_COORDS = False

_C.MODEL.CONDINST.MASK_BRANCH = CN()
# Channels of the mask features shared by all instances.
_C.MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS = 8
_C.MODEL.CONDINST.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]
_C.MODEL.CONDINST.MASK_BRANCH.CHANNELS = 128
# Normalisation in the mask branch: "BN", "SyncBN", "GN" or "" (none).
_C.MODEL.CONDINST.MASK_BRANCH.NORM = "BN"
_C.MODEL.CONDINST.MASK_BRANCH.NUM_CONVS = 4

# ---------------------------------------------------------------------------------------
# BoxInst (AdelaiDet): CondInst trained from boxes only
# ---------------------------------------------------------------------------------------
_C.MODEL.BOXINST = CN()
# Box supervision: projection and colour-pairwise mask losses; annotation masks are not read
# (unless GT_MASKS says so).
_C.MODEL.BOXINST.ENABLED = False
# Rows at the bottom of every image, in original-image pixels, left out of the pairwise term.
_C.MODEL.BOXINST.BOTTOM_PIXELS_REMOVED = 10

_C.MODEL.BOXINST.PAIRWISE = CN()
# Neighbourhood of the pairwise term: SIZE x SIZE kernel with this dilation (8 neighbours).
_C.MODEL.BOXINST.PAIRWISE.SIZE = 3
_C.MODEL.BOXINST.PAIRWISE.DILATION = 2
# Linear warm-up of the pairwise term over this many training iterations.
_C.MODEL.BOXINST.PAIRWISE.WARMUP_ITERS = 10000
# Neighbours whose LAB colour similarity is at least this must take the same label.
_C.MODEL.BOXINST.PAIRWISE.COLOR_THRESH = 0.3

# Mixed supervision (BoxInst and BoxTeacher): which instances also learn from their annotation
# mask. "ignore": none (pure box supervision); "present": every instance whose annotation has a
# non-empty segmentation; "fraction": those of a seeded random GT_MASK_FRACTION of the training
# images that have masks (the others' segmentations are dropped; the kept image ids are saved to
# OUTPUT_DIR/mask_image_ids.json). Masked positives get CondInst's Dice loss (loss_gt_mask).
_C.MODEL.BOXINST.GT_MASKS = "ignore"
# With GT_MASKS "fraction": the share of the training images with masks that keep them, in [0, 1].
_C.MODEL.BOXINST.GT_MASK_FRACTION = 1.0
# Also apply the box terms (loss_prj, loss_pairwise) to instances supervised by their mask.
_C.MODEL.BOXINST.BOX_TERMS_ON_MASKED = False

# ---------------------------------------------------------------------------------------
# BoxTeacher (MODEL.META_ARCHITECTURE "BoxTeacher"; key names of the original release)
# ---------------------------------------------------------------------------------------
_C.MODEL.BOX_TEACHER = CN()
# Box-based assignment: a teacher detection labels a ground-truth box when their IoU is at
# least IOU_THR and its mask-aware score at least SCORE_THR.
_C.MODEL.BOX_TEACHER.IOU_THR = 0.5
_C.MODEL.BOX_TEACHER.SCORE_THR = 0.0
# The released code tests "already matched" with "> 0", so a box matched to the first detection
# can be taken over; True reproduces it (for parity), False is the intended greedy matching.
_C.MODEL.BOX_TEACHER.LEGACY_ASSIGNMENT = False
# EMA momentum of the teacher: min(MOMENTUM, t / (t + 1)) at iteration t.
_C.MODEL.BOX_TEACHER.MOMENTUM = 0.999
# If > 0, the cap is at most 1 - 1 / (EMA_HORIZON * SOLVER.MAX_ITER): the teacher averages over
# this fraction of the schedule (0.999 is 1.1% of the 90k-iteration 1x schedule). Short
# schedules need it: with 0.999 a 1000-iteration run's teacher lags the whole run.
_C.MODEL.BOX_TEACHER.EMA_HORIZON = 0.0
# Weights of the pixel (Dice) and affinity pseudo-mask losses.
_C.MODEL.BOX_TEACHER.MASK_WEIGHT = 0.5
_C.MODEL.BOX_TEACHER.MASK_AFFINITY_WEIGHT = 0.1
# Neighbour pairs with pseudo-mask affinity >= this join the affinity loss; -1: soft weights.
_C.MODEL.BOX_TEACHER.MASK_AFFINITY_THRESH = 0.5
# Linear warm-up of the pseudo-mask losses over WARMUP_ITERS training iterations.
_C.MODEL.BOX_TEACHER.WITH_WARMUP = True
_C.MODEL.BOX_TEACHER.WARMUP_ITERS = 10000
# Extra Dice loss between mean-projections of student and pseudo masks ("loss_avg").
_C.MODEL.BOX_TEACHER.WITH_AVG_LOSS = False
_C.MODEL.BOX_TEACHER.AVG_LOSS_WEIGHT = 0.1
# Normalise the pseudo-mask losses by the number of weighted masks (True) or the sum of weights.
_C.MODEL.BOX_TEACHER.FIX_REDUCTION = True
# Evaluate with the teacher (True) or the student.
_C.MODEL.BOX_TEACHER.USE_TEACHER_INFERENCE = True
# Evaluation also evaluates the other network (the student when USE_TEACHER_INFERENCE, else the
# teacher), its results logged and written under its name ("student/segm/AP"...).
_C.MODEL.BOX_TEACHER.EVAL_BOTH = False
# Run the teacher pass in eval mode. The original runs it in train mode (the mask branch's BN
# then uses batch statistics). In eval mode the teacher never updates its BN running
# statistics, so the EMA averages them too (the original left them at iteration 0's). A Mask R-CNN
# teacher always runs in eval mode (torchvision's heads sample proposals in train mode).
_C.MODEL.BOX_TEACHER.TEACHER_EVAL = False
# Pseudo masks as probabilities instead of binary masks (the mask-aware score then averages
# over the whole image, which the original does too).
_C.MODEL.BOX_TEACHER.RETURN_FLOAT_MASK = False
# The student learns from the teacher's mask probabilities: soft Dice targets and affinities
# from the soft masks, instead of masks binarised at TEACHER_MASK_THRESHOLD (not in the
# original; the mask-aware score is unchanged). Binary targets at the mask stride (4) lose
# the boundaries of small objects.
_C.MODEL.BOX_TEACHER.SOFT_PSEUDO_MASKS = False
# Binarisation threshold of the teacher's masks, also the threshold of the mask-aware score.
_C.MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD = 0.5
# Mask-aware score averaged only inside the predicted box (the paper) instead of over the mask.
_C.MODEL.BOX_TEACHER.SCORE_IN_BOX = False
# Zero the teacher's mask probabilities outside its predicted box before scoring.
_C.MODEL.BOX_TEACHER.CLIP_MASKS_TO_BOXES = False
# The teacher sees every image resized to the test size (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST),
# as the original does; False: at the student's training size, which costs less when training
# sizes are below the test size (not in the original).
_C.MODEL.BOX_TEACHER.TEACHER_TEST_SIZE = True
# Refine the assigned teacher masks inside their box with the colour guided filter (clean view
# as guide; window radius in input pixels, 0: off as in the original) before they are
# binarised (not in the original). The teacher's masks come from a stride-4 map and blur
# boundaries over a few pixels, which self-training on them reinforces; the filter moves them
# onto colour edges.
_C.MODEL.BOX_TEACHER.REFINE_RADIUS = 0
# Regularisation of the filter for colours in [0, 1] (larger: follows weaker edges less).
_C.MODEL.BOX_TEACHER.REFINE_EPS = 0.01

# The student's detector (the teacher is the EMA of a network built alike): "CondInst" (the
# release) or "MaskRCNN" (torchvision's, MODEL.MASK_RCNN.*; its mask head learns from the pseudo
# masks with Mask R-CNN's cross-entropy and from the boxes with BoxInst's terms on the RoI grid).
_C.MODEL.BOX_TEACHER.STUDENT = "CondInst"
# A frozen teacher instead of the EMA: the config file of a trained network (a CondInst, BoxInst,
# BoxTeacher or MaskRCNN config; its MODEL keys build the teacher, of any architecture) and its
# weights. The pseudo-labelling settings (MODEL.BOX_TEACHER.*) are this config's; evaluation
# uses the student.
_C.MODEL.BOX_TEACHER.TEACHER_CONFIG = ""
_C.MODEL.BOX_TEACHER.TEACHER_WEIGHTS = ""

# Semi-supervised training (DATASETS.UNLABELED; after Guided Distillation, WACV 2024): the
# teacher's detections of an unlabelled image scoring at least SCORE_HIGH (its ranking score)
# become instances (mask binarised at MODEL.BOX_TEACHER.TEACHER_MASK_THRESHOLD, weighted by the
# mask-aware score; masks under MIN_MASK_AREA pixels dropped); those in [SCORE_LOW, SCORE_HIGH)
# become regions the classification loss ignores. Measured on shapes_val with a BoxTeacher
# trained on 30 % of shapes_train: 1.7 detections per image (2.5 objects) with a box precision
# of 0.86 at 0.7, 6.6 at 0.40 at 0.5, 44 at 0.12 at 0.3. The student's losses on unlabelled
# images count UNLABELED_WEIGHT (lambda_u) times, from MODEL.BOX_TEACHER.WARMUP_ITERS on
# (before that the teacher is not worth learning from; from 0 with TEACHER_WEIGHTS).
_C.MODEL.SEMI = CN()
_C.MODEL.SEMI.SCORE_HIGH = 0.7
_C.MODEL.SEMI.SCORE_LOW = 0.5
_C.MODEL.SEMI.MIN_MASK_AREA = 5
_C.MODEL.SEMI.UNLABELED_WEIGHT = 2.0
# Guided Distillation's teacher schedule: the weights of a network trained on the labelled part
# (a CondInst / BoxInst / BoxTeacher checkpoint) load into the teacher, which stays as loaded for
# BURN_IN_ITERS iterations while a fresh student (MODEL.WEIGHTS) learns from it and from its
# pseudo instances (from iteration 0 on); then the student is copied into the teacher and the
# EMA (MODEL.BOX_TEACHER.MOMENTUM; the paper's 0.9996) runs from there. Empty / 0: the teacher
# is the EMA of the student from the start.
_C.MODEL.SEMI.TEACHER_WEIGHTS = ""
_C.MODEL.SEMI.BURN_IN_ITERS = 0
# Stage 1 in the same command: train_net.py first trains the teacher on DATASETS.TRAIN alone
# (same config and schedule, no unlabelled images) in OUTPUT_DIR/teacher, then the student
# (stages 2 and 3) with its model_final.pth as TEACHER_WEIGHTS (needs BURN_IN_ITERS > 0 and no
# TEACHER_WEIGHTS). With --resume a finished stage 1 is kept and an unfinished one resumed.
_C.MODEL.SEMI.TRAIN_TEACHER = False

# ---------------------------------------------------------------------------------------
# Mask R-CNN (MODEL.META_ARCHITECTURE "MaskRCNN", or BoxTeacher with STUDENT "MaskRCNN"):
# torchvision's network on MODEL.RESNETS.DEPTH / NORM, MODEL.BACKBONE.FREEZE_AT,
# MODEL.FPN.OUT_CHANNELS and MODEL.FCOS.NUM_CLASSES (the number of classes of every network).
# ---------------------------------------------------------------------------------------
_C.MODEL.MASK_RCNN = CN()
# 1: maskrcnn_resnet50_fpn's heads; 2: maskrcnn_resnet50_fpn_v2's (BatchNorm in the FPN and
# the heads, a two-convolution RPN head, a four-convolution box head).
_C.MODEL.MASK_RCNN.VERSION = 1
_C.MODEL.RPN = CN()
# Proposals kept per image after the RPN's NMS.
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
_C.MODEL.ROI_HEADS = CN()
# RoIs sampled per image for the box and class losses, and the positives' share of them.
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
_C.MODEL.ROI_BOX_HEAD = CN()
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
_C.MODEL.ROI_MASK_HEAD = CN()
_C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256

# ---------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------
_C.INPUT = CN()
# Training: the short side is drawn from MIN_SIZE_TRAIN ("choice") or uniformly from the range
# [MIN_SIZE_TRAIN[0], MIN_SIZE_TRAIN[-1]] ("range"); the long side is capped at MAX_SIZE_TRAIN.
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
_C.INPUT.MAX_SIZE_TRAIN = 1333
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
# Random horizontal flip (p = 0.5) in training.
_C.INPUT.HFLIP_TRAIN = True
# Channel order of the model input: "BGR" or "RGB".
_C.INPUT.FORMAT = "BGR"
# BoxTeacher's colour-only perturbation of the student view: "strong", "strongv2", "weak" or
# "none" (see boxteacher/data/color_augment.py).
_C.INPUT.AUG_TYPE = "strong"
# True: the perturbed view is a separate "aug_image" (the teacher and the colour prior see the
# clean "image"). False: it replaces "image" for everyone.
_C.INPUT.AUG_EXTRA = True

# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Names of registered datasets for training and evaluation.
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()
# COCO-format datasets given by path, registered under a name before use:
# [[name, annotation json, image folder], ...]. Relative paths are taken from the working
# directory.
_C.DATASETS.REGISTER = []
# Pairs of class names that a horizontal flip swaps, e.g. [["left_door", "right_door"]].
_C.DATASETS.FLIP_CLASS_PAIRS = []
# Semi-supervised training: names of registered datasets whose images are used without their
# labels (a labelled dataset may serve too), next to the labelled DATASETS.TRAIN. Needs an
# architecture that learns from unlabelled images (BoxTeacher with a CondInst student).
_C.DATASETS.UNLABELED = ()
# Unlabelled images given by path, registered under a name before use: [[name, source], ...] or
# [[name, json, image folder], ...]; source: a COCO json (its images; annotations ignored) or a
# folder of images.
_C.DATASETS.REGISTER_UNLABELED = []

_C.DATALOADER = CN()
# Worker processes per training process (0 = load in the main process).
_C.DATALOADER.NUM_WORKERS = 4
# Batch images of the same orientation (landscape / portrait) together.
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
# Drop training images without any (non-crowd) annotation.
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
# Semi-supervised: unlabelled images per labelled image of a batch (a batch holds
# SOLVER.IMS_PER_BATCH labelled images and round(ratio * SOLVER.IMS_PER_BATCH) unlabelled ones,
# drawn by a sampler of their own).
_C.DATALOADER.UNLABELED_RATIO = 1.0

# ---------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------
_C.SOLVER = CN()
# "SGD" or "ADAMW".
_C.SOLVER.OPTIMIZER = "SGD"
# LR multiplier of the parameters whose name contains "backbone" (the FPN included).
_C.SOLVER.BACKBONE_MULTIPLIER = 1.0
# "WarmupMultiStepLR" or "WarmupCosineLR".
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.WEIGHT_DECAY = 0.0001
# Weight decay of normalisation layers' weights and biases (detectron2: 0.0).
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
# LR multiplier of biases.
_C.SOLVER.BIAS_LR_FACTOR = 1.0
# Multiply the LR by GAMMA at each of STEPS.
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (30000,)
# Warm-up from WARMUP_FACTOR x BASE_LR, "linear" or "constant".
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_METHOD = "linear"
# Save a checkpoint every this many iterations.
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Images per batch over all processes.
_C.SOLVER.IMS_PER_BATCH = 16

_C.SOLVER.CLIP_GRADIENTS = CN()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
# "value" (clip each element), "norm" (per parameter) or "full_model" (one norm over all).
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

_C.SOLVER.AMP = CN()
# Mixed precision training: the forward pass (student and teacher) under torch.autocast; the
# losses, the training targets and the pseudo labels stay in float32.
_C.SOLVER.AMP.ENABLED = False
# "bfloat16", "float16" (with loss scaling) or "auto": bfloat16 where the device supports it
# (CPUs, CUDA GPUs from Ampere on), float16 otherwise.
_C.SOLVER.AMP.PRECISION = "auto"

# ---------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate every this many iterations (0 = only after training).
_C.TEST.EVAL_PERIOD = 0
# Detections kept per image (Mask R-CNN; CondInst's is MODEL.FCOS.POST_NMS_TOPK_TEST).
_C.TEST.DETECTIONS_PER_IMAGE = 100

# ---------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------
# Where logs, metrics, checkpoints and evaluation results go.
_C.OUTPUT_DIR = "./output"
# Random seed; negative = drawn at random (and saved in checkpoints so that resuming repeats it).
_C.SEED = -1
# Every this many iterations (0 = never), a picture of the first image of the batch just trained
# on goes to TensorBoard and OUTPUT_DIR/vis/iter_XXXXXXX.png: the ground-truth boxes and the
# predicted masks, and for BoxTeacher the teacher's pseudo masks (engine/visualization.py).
_C.VIS_PERIOD = 0
# cuDNN benchmark mode (faster for fixed input sizes, not deterministic).
_C.CUDNN_BENCHMARK = False
