r"""The paper's whole experiment as one sweep (apjax.experiment): teacher, distillation and pruning runs,
evaluation and a report with the paper's tables.

  python train.py --config configs/paper.py:demo --workdir workdirs/demo     # 5 to 8 minutes on 2 CPU cores
  python train.py --config configs/paper.py:science --workdir workdirs/science  # under an hour, 2 CPU cores
  python train.py --config configs/paper.py:blackbox --workdir workdirs/blackbox  # a black-box teacher
  python train.py --config configs/paper.py:small --workdir workdirs/sweep_small   # hours on a CPU
  python train.py --config configs/paper.py --workdir workdirs/paper \
      --config.teacher.init_from=/path/to/vgg16_bn.pth                      # VOC, SPEC's full recipes

The paper variant refuses a teacher without ImageNet weights (``--config.teacher.init_from``; or
``--config.teacher.from_scratch=True`` on purpose) and picks every best checkpoint by the reference's
per-image AP.

The same sweep on the second model family (not the paper's): ``model=resnet18`` or ``model=resnet50``
(configs/teacher_resnet.py and configs/resnet_kd.py; matching at ``layer4``; unstructured pruning only,
since structured pruning and the rule-based methods of Table 8 need VGG's plain conv chain):

  python train.py --config configs/paper.py:demo,model=resnet18 --workdir workdirs/demo_resnet

Variants (after the colon): ``demo`` (synthetic benchmark, a VGG16/8 teacher and its x2 student with and
without SSWA: the story in minutes), ``science`` (the demo's teacher; its x2 student with KD, EWA, SWA and
SSWA, and both prunings with naive, EWA, SWA and SSWA fine-tuning, each on 3 seeds: the paper's Table 2
and Tables 4-7 with 95% intervals and paired differences, under an hour on 2 CPU cores), ``blackbox`` (the
science variant's teacher and x2 student, 3 seeds: KD, SSWA, and the black-box teacher's methods
``bb_gradcam`` and ``bb_input_grad`` matching its RISE maps; docs/blackbox.md), ``small`` (the
CPU-sized variant of every config: all students and methods, both prunings), and the default ``paper``
(PASCAL VOC 2012 at 227x227, VGG16, every recipe as in
SPEC section 6; needs a GPU or TPU). Each stage runs in ``<workdir>/<stage>``; rerunning the command skips
finished stages. Choose stages with ``--config.only=teacher,kd_x8_*`` (glob patterns); the stage
configs are ``config.teacher``, ``config.kd``, ``config.prune_unstructured``, ``config.prune_structured`` and
``config.quantize`` (override any field, e.g. ``--config.kd.num_epochs=100``); ``config.data`` is shared by
all stages. ``config.quant_bits`` and ``config.quant_methods`` choose the quantization stages
(``quant_<bits>_<method>``; none in the demo). ``config.seeds`` (seed offsets, default ``(0,)``) repeats
every training stage per seed (``kd_x2_sswa``, ``kd_x2_sswa@s1``, ...) and the report gives means with
95% t intervals and paired differences; ``config.teacher_per_seed`` trains a teacher per seed too.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from apjax.attribution.methods import MethodOptions
from apjax.compress.matching import matching_methods
from configs import (
    prune_structured,
    prune_unstructured,
    quantize,
    resnet_kd,
    teacher_resnet,
    teacher_vgg16,
    vgg16_kd,
)
from configs.common import data_config, parse_arg

# The matching weight of the demo and science variants' students (the small variant's configs use 10): at
# this scale a larger beta costs classification (docs/results.md, "Matching's cost at the demo's scale").
DEMO_BETA = 10.0
# The blackbox variant's RISE evaluation: 256 masks of a 4 x 4 grid kept with p = 0.5 (at 64 px the cheapest
# measured setting for a given agreement with a 4096-mask map; docs/blackbox.md).
BLACKBOX_EVAL_RISE = dict(rise_masks=256, rise_cells=4, rise_keep=0.5, rise_chunk=32)


def method_options_config() -> ml_collections.ConfigDict:
    """Every field of :class:`MethodOptions` at its default (a field without one takes an int)."""
    options = dataclasses.asdict(MethodOptions())
    return ml_collections.ConfigDict(
        {k: placeholder(int) if v is None else v for k, v in options.items()}
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, demo=False, small=False, science=False, blackbox=False, model="vgg16")
    if a.model not in ("vgg16", *teacher_resnet.MODELS):
        raise ValueError(f"unknown model {a.model!r}; choose vgg16, {' or '.join(teacher_resnet.MODELS)}.")
    variant = "demo" if a.demo else "science" if a.science else "small" if a.small else "paper"
    variant = "blackbox" if a.blackbox else variant
    stage_arg = "data=synthetic,small" if variant != "paper" else ""
    c = ml_collections.ConfigDict()
    c.task = "experiment"
    c.variant = variant
    c.only = ""  # comma-separated glob patterns over stage names; '' = every stage
    c.distributed = False
    # Seed offsets: every training stage runs once per offset k with its own config's seed + k, in the
    # workdir <stage> for k = 0 (where a sweep without seeds has it) and <stage>@s<k> otherwise; the report
    # shows each number's mean over the seeds with its 95% Student t interval (n = 1: the value alone).
    # E.g. --config.seeds="(0,1,2)".
    c.seeds = (0,)
    # False: one teacher (offset 0) for every seed's students (cheaper; the teacher's row has n = 1).
    # True: a teacher per seed (teacher@s<k>), each seed's students distilled from and compared with it.
    c.teacher_per_seed = False
    c.data = data_config("voc" if variant == "paper" else "synthetic", variant != "paper", None)

    c.students = ("x2", "x4", "x8")
    c.kd_methods = ("kd", *matching_methods())  # every registered matching map (apjax.compress.matching)
    c.prune_kinds = ("unstructured", "structured")
    c.prune_methods = ("naive", *matching_methods())
    # Quantization-aware training of the teacher (configs/quantize.py; not in the paper): int8 weights and
    # activations, int4 weights; stages quant_<bits>_<method>.
    c.quant_bits = ("int8", "int4w")
    c.quant_methods = ("naive", *matching_methods())
    c.eval_methods = ("gradcam",)  # Tables 1, 2, 4-7
    # Teacher and the smallest student; RISE and occlusion are black-box (not in the paper's Table 8).
    c.table8_methods = ("gradcam", "excitation_bp", "lrp", "rap", "rise", "occlusion")
    # The attribution methods' settings (apjax.attribution.methods.MethodOptions: RISE's masks, occlusion's
    # patch, ...), e.g. --config.method_options.rise_masks=6000 (RISE's own N at 224 px).
    c.method_options = method_options_config()
    # Deletion and insertion AUC and MoRF AOPC (region perturbation; region_size None: 9 px at 227 px
    # scaled to the input) of each run's own maps on its own model in the eval stage
    # (apjax/evaluators/faithfulness.py; the report's Faithfulness table); on in the science variant.
    c.faithfulness = ml_collections.ConfigDict(
        dict(enabled=False, steps=32, deletion_baseline="zero", insertion_baseline="blur",
             blur_sigma=placeholder(float), region_size=placeholder(int), regions=64,
             region_baseline="uniform")
    )  # fmt: skip
    c.eval_batch_size = 32
    c.figure_images = 6
    # The deploy stage (apjax/deploy/latency.py): every finished seed-0 run exported to deploy/exports/<run>
    # and its predict and explain timed warm, `calls` calls at batch 1 and `batch_calls` at `batch_size`,
    # into deploy/latency.json (the report's Deployment table); on in the science variant.
    c.deploy = ml_collections.ConfigDict(dict(enabled=False, calls=30, batch_calls=5, batch_size=64))

    c.teacher = teacher_vgg16.get_config(stage_arg)
    c.kd = vgg16_kd.get_config(stage_arg)
    c.prune_unstructured = prune_unstructured.get_config(stage_arg)
    c.prune_structured = prune_structured.get_config(stage_arg)
    c.quantize = quantize.get_config(stage_arg)
    if a.model != "vgg16":
        resnet_arg = ",".join(filter(None, (stage_arg, f"model={a.model}")))
        c.teacher = teacher_resnet.get_config(resnet_arg)
        c.kd = resnet_kd.get_config(resnet_arg)
        c.prune_unstructured.model = c.teacher.model
        c.prune_unstructured.dropout_rate = 0.0
        c.prune_unstructured.distill.taps = c.kd.distill.taps
        c.quantize.dropout_rate = 0.0
        c.quantize.distill.taps = c.kd.distill.taps
        c.prune_kinds = ("unstructured",)  # structured pruning cuts a plain conv chain (VGG) only
        # Excitation BP, LRP and RAP walk a plain conv chain (VGG) only.
        c.table8_methods = ("gradcam", "rise", "occlusion")
    for stage in (c.teacher, c.kd, c.prune_unstructured, c.prune_structured, c.quantize):
        del stage["data"]  # the sweep's config.data is used by every stage
        if variant == "paper":
            # The reference keeps the checkpoint with the best per-image AP (its and the paper's "mAP").
            stage.best_metric = "per_image_AP"

    if variant in ("demo", "science", "blackbox"):
        # Fewer images and a VGG16/8 teacher: a teacher far above chance, and students with and without
        # matching, within the 10 minutes of a 2-core CPU.
        c.data.split_sizes.update(train=2000, val=400, segmentation_val=200)
        c.teacher.model = "vgg16/8" if a.model == "vgg16" else c.teacher.model
        c.teacher.num_epochs, c.teacher.lr_decay_epochs = 10, (8,)
        c.students = ("x2",)
        c.kd_methods = ("kd", "sswa")
        c.kd.num_epochs, c.kd.lr_decay_epochs = 8, (6,)
        c.prune_kinds = ()
        c.quant_bits = ()  # the demo is unchanged; e.g. --config.quant_bits="('int8','int4w')" adds them
        c.table8_methods = ()
        c.kd.distill.beta = DEMO_BETA
    if variant == "blackbox":
        # A teacher that answers with logits only (apjax.compress.blackbox): its RISE maps, computed once per
        # image by the teacher cache, matched by the student's Grad-CAM and input gradient; against KD and
        # SSWA (which reads everything) on the science variant's data, teacher and x2 student, 3 seeds.
        # Every run reads the teacher from a cache of one augmentation draw, so all see the same crops.
        c.seeds = (0, 1, 2)
        c.kd_methods = ("kd", "sswa", *matching_methods("blackbox"))
        c.kd.distill.teacher_cache = 1
        # e2KD's form. With both maps non-zero, squared_mean = (1 - cos) * 2 / P, and SSWA's map at conv5_3
        # has P = 16 positions at 64 px: cosine with beta 1.25 is the science variant's SSWA loss (beta 10)
        # exactly, and gives the black-box maps (16 x 16) the same weight on 1 - cos.
        c.kd.distill.matching_form = "cosine"
        c.kd.distill.beta = DEMO_BETA * 2 / 16
        c.eval_methods = ("gradcam", "rise")  # do the students' RISE maps move toward the teacher's too?
        c.method_options.update(BLACKBOX_EVAL_RISE)
        c.faithfulness.enabled = True
    if variant == "science":
        # The paper's comparisons on the demo's teacher, with intervals: Table 2 for one student (every
        # matching map against KD) and Tables 4-7 (both prunings, naive against every map), 3 seeds each.
        c.seeds = (0, 1, 2)
        c.kd_methods = ("kd", *matching_methods())
        c.prune_kinds = ("unstructured", "structured")
        c.prune_methods = ("naive", *matching_methods())
        c.faithfulness.enabled = True
        c.deploy.enabled = True
        for stage in (c.prune_unstructured, c.prune_structured):
            stage.distill.beta = DEMO_BETA
    return c
