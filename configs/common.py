"""Pieces shared by the configs: argument parsing and the dataset block."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# The synthetic benchmark's "small" variant, sized for a laptop CPU: 72x72 images (64x64 crops), a few
# thousand of them, 10 classes and at most 2 objects (with 20 classes and 4 objects, a VGG16/8 from scratch
# needs far more than a few minutes to get past the label prior).
SMALL_SYNTHETIC = dict(image_size=72, num_classes=10, min_objects=1, max_objects=2, num_distractors=2)
SMALL_SPLITS = dict(train=3000, val=600, segmentation_val=300)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``'data=synthetic,small'`` -> ConfigDict(data='synthetic', small=True, ...defaults).

    Flags without a value are True; values are parsed as int, float, bool or kept as strings. Keys not
    in ``defaults`` are an error, so a misspelled variant does not pass silently.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; the arguments are {sorted(defaults)}."
            )
        if not sep:
            out[key] = True
            continue
        value = value.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        out[key] = value
    return ml_collections.ConfigDict(out)


def data_config(data: str, small: bool, image_size: int | None) -> ml_collections.ConfigDict:
    """The ``config.data`` block for ``voc`` or ``synthetic`` (small: 64x64 and few images).

    ``cache_size``: 0 (the default, the reference's pipeline) caches every image at its original
    resolution, so RandomResizedCrop cuts its box from the original pixels and resizes it once, and eval
    images and masks are resized once from the original (SPEC section 3). ``N > 0`` squashes every image
    to N x N in the cache first: a DEVIATION from the reference (most training crops are then upsampled
    from the smaller copy, so blurrier than torchvision's, and eval images and masks are resized twice),
    for hosts short of memory or to repeat runs made with it (earlier versions used 256).

    ``on_device``: False (the default) copies each batch from the host cache to the devices; True holds
    the whole training split in every device's memory (refused when it needs more than half of it) and
    gathers each batch there. The batches are the same either way.

    ``split_sizes`` (synthetic benchmark only) is the number of images per split. VOC has none: its
    splits are the official image lists, and giving other sizes is refused.
    """
    if data not in ("voc", "synthetic"):
        raise ValueError(f"unknown data {data!r}; choose voc or synthetic.")
    c = ml_collections.ConfigDict()
    c.dataset = data
    c.data_dir = "~/tensorflow_datasets"  # tfds's data_dir; prepare VOC with python -m apjax.data.prepare
    c.image_size = image_size or (64 if small else 227)
    c.cache_size = 0  # 0: original resolution (faithful); N > 0: squash to NxN (a deviation)
    # True: the training split's uint8 cache is copied once into every device's memory and each batch is a
    # gather there (only its indices leave the host); VOC's original-resolution train split is 4.3 GB.
    c.on_device = False
    # RandomResizedCrop's area range: torchvision's default for VOC; milder on the small images, where a
    # 0.08 crop of a 72-pixel image often cuts every object out and leaves its labels wrong.
    c.crop_scale = (0.35, 1.0) if small else (0.08, 1.0)
    # The synthetic benchmark's generator (ignored for VOC); see apjax.data.synthetic.SyntheticConfig. Its
    # images are generated at `image_size` (the original resolution): a little larger than the crops, so
    # that RandomResizedCrop has room to resample from.
    side = c.image_size + c.image_size // 8 if small else 256
    c.synthetic = ml_collections.ConfigDict(
        dict(SMALL_SYNTHETIC, image_size=side, context_prob=0.0, context_noise=0.0, seed=0)
    )
    if not small:
        c.synthetic.num_classes, c.synthetic.max_objects, c.synthetic.num_distractors = 20, 4, 3
    if data == "synthetic":
        c.split_sizes = ml_collections.ConfigDict(
            SMALL_SPLITS if small else dict(train=5717, val=5823, segmentation_val=1449)
        )
    return c


def teacher_matching_config(method: str, small: bool) -> ml_collections.ConfigDict:
    """The ``config.distill`` block: the teacher and the attribution-matching term (SPEC section 5).

    Used by distillation (methods kd|ewa|swa|sswa) and by pruning (naive|ewa|swa|sswa), whose teacher is
    the unpruned net. The defaults are the reference's; ``small`` points at the small teacher and matches
    at ``conv5_3`` (at 64x64 the post-pool map is only 2x2).
    """
    c = ml_collections.ConfigDict()
    c.teacher_workdir = "workdirs/teacher_small" if small else "workdirs/teacher"
    c.teacher_checkpoint = "best"  # or "latest"
    c.method = method
    # The layer set I: the reference matches one layer, the output of the last max-pool.
    c.taps = ("conv5_3",) if small else ("pool5",)
    c.beta = 100.0  # the reference's beta for SWA/SSWA (none is published for EWA)
    c.matching_form = "squared_mean"  # the reference's; "l2" is the paper's formula
    c.sswa_mode = "fixed_count"  # the reference's; "bernoulli" is the paper's R_c ~ Bern(1 - drop)
    c.sswa_drop = 0.3  # fraction of teacher channels dropped (the reference's README)
    c.temperature = 4.0  # KD only
    c.alpha = 0.9  # KD only
    # KD only: the reference's log(p + 1e-7) of the student's probabilities; 0.0 = exact log-sigmoid.
    c.kd_log_eps = 1e-7
    # Training without the live teacher (apjax.compress.teacher_cache): E > 0 computes the teacher's outputs
    # on E augmentation draws of every training image once (epoch n reads draw n mod E); 0 runs the teacher
    # in every step, as the reference does. Stored as teacher_cache_dtype, in teacher_cache_dir ('' = under
    # the teacher's workdir, shared by runs with the same settings).
    c.teacher_cache = 0
    c.teacher_cache_dtype = "bfloat16"
    c.teacher_cache_dir = ""
    # How the teacher may be read (apjax.compress.blackbox): "full" (its activations and gradients, every
    # method above) or "blackbox" (its logits only: methods bb_gradcam and bb_input_grad match its RISE or
    # occlusion map, computed once per image and draw by the teacher cache, so teacher_cache >= 1).
    c.teacher_access = "full"
    c.blackbox = ml_collections.ConfigDict()
    c.blackbox.map = "rise"  # or "occlusion"
    c.blackbox.size = 16  # the stored map's side: two or more samples per RISE grid cell (s <= 8)
    # The map's settings (apjax.attribution.methods.MethodOptions' rise_* and occlusion_* fields and the
    # masks' seed). At full size RISE's evaluation defaults (N = 1000, s = 8, p = 0.1); small: 128 masks of a
    # 4 x 4 grid kept with p = 0.5, the cheapest setting measured to reach a given agreement with a
    # 4096-mask map at 64 px (docs/blackbox.md).
    c.blackbox.options = ml_collections.ConfigDict(
        dict(rise_masks=128, rise_cells=4, rise_keep=0.5, rise_chunk=32) if small
        else dict(rise_masks=1000, rise_cells=8, rise_keep=0.1, rise_chunk=50)
    )  # fmt: skip
    c.blackbox.options.occlusion_size = placeholder(int)  # None: an eighth of the image side
    c.blackbox.options.occlusion_stride = placeholder(int)  # None: half the patch
    c.blackbox.options.occlusion_baseline = 0.0
    c.blackbox.options.seed = 0
    return c


def set_recipe(
    c: ml_collections.ConfigDict,
    *,
    num_epochs: int,
    learning_rate: float,
    momentum: float,
    lr_decay_epochs: tuple[int, ...] = (),
    batch_size: int = 64,
    best_metric: str = "mAP",
) -> None:
    """Sets a training recipe (SPEC section 6) on ``c``: SGD with weight decay 1e-4 (torch-style), a
    piecewise-constant learning rate multiplied by ``lr_decay_factor`` at each of ``lr_decay_epochs``
    (none: constant), a global ``batch_size`` over all devices, the logging and checkpoint cadence, the
    extra evaluators ``evals`` (none), ``tensorboard`` (True: event files in ``<workdir>/tensorboard/``), and
    ``best_metric``, the val metric that picks the best checkpoint: ``mAP`` (VOC mAP, sklearn's AP),
    ``mAP_devkit`` (VOC mAP, the devkit's AP) or ``per_image_AP`` (the reference's criterion, the paper's
    "mAP"; ``configs/paper.py`` uses it on VOC)."""
    c.batch_size = batch_size
    c.best_metric = best_metric
    c.num_epochs = num_epochs
    c.optimizer = ml_collections.ConfigDict(
        dict(name="sgd", learning_rate=learning_rate, momentum=momentum, weight_decay=1e-4, nesterov=False)
    )
    # Clip the loss gradient to this global norm before the step (torch's clip_grad_norm_); 0 = off.
    c.optimizer.clip_norm = 0.0
    c.lr_decay_epochs = tuple(lr_decay_epochs)
    c.lr_decay_factor = 0.1
    c.log_every_steps = 50
    c.eval_every_epochs = 1
    c.checkpoint_every_epochs = 1
    # Extra evaluators at each evaluation (apjax.evaluators), beside the task's own classification on val:
    # name -> options, e.g. evals.localization = dict(methods=("gradcam",)); none by default.
    c.evals = ml_collections.ConfigDict()
    c.distributed = False  # call jax.distributed.initialize() (multi-process runs)
    # Scalars and a maps picture at each evaluation in <workdir>/tensorboard/ (process 0; tensorboardX).
    c.tensorboard = True


def pruning_config(task: str, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The part both pruning configs share: the task, the teacher's model (pruning starts from its
    weights), the data, the teacher and matching block, and an empty ``prune`` block.

    ``a`` holds the parsed arguments ``data``, ``small``, ``size``, ``method`` and ``bf16``.
    """
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 42
    c.data = data_config(a.data, a.small, a.size or None)
    c.model = "vgg16/4" if a.small else "vgg16"  # must be the teacher's model: pruning starts from it
    c.dropout_rate = 0.5
    c.precision = "bfloat16" if a.bf16 else "float32"
    c.init_from = ""  # unused: the weights come from the teacher
    c.model_init = "pytorch_default"  # unused: the weights come from the teacher
    c.distill = teacher_matching_config(a.method, small=a.small)
    c.prune = ml_collections.ConfigDict()
    return c
