r"""Attribution-preserving distillation of a ResNet teacher into a width-divided ResNet (x2, x4, x8).

Not a setting of the paper (its nets are VGG16s): the method of configs/vgg16_kd.py on the ResNet family,
matching at the output of the last stage (``layer4``, also the Grad-CAM layer). On VOC, after
configs/teacher_resnet.py:

  python train.py --config configs/resnet_kd.py:model=resnet50,student=x4 --workdir workdirs/r50_x4_sswa \
      --config.distill.teacher_workdir=workdirs/teacher_r50

On the synthetic benchmark's small variant (after the small teacher of configs/teacher_resnet.py, a
ResNet-18/4; the x2 student is a ResNet-18/8):

  python train.py --config configs/resnet_kd.py:data=synthetic,small,method=kd --workdir workdirs/r18_kd_small
  python train.py --config configs/resnet_kd.py:data=synthetic,small --workdir workdirs/r18_sswa_small

Arguments (after the colon, comma separated): model=resnet18|resnet50 (the teacher's), student=x2|x4|x8,
method=kd|ewa|swa|sswa, data=voc|synthetic, small, size=N, bf16.
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config, parse_arg, set_recipe, teacher_matching_config

MODELS = ("resnet18", "resnet50")
STUDENTS = ("x2", "x4", "x8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg, data="voc", small=False, size=0, model="resnet18", student="x8", method="sswa", bf16=False
    )
    if a.model not in MODELS:
        raise ValueError(f"unknown model {a.model!r}; choose one of {list(MODELS)}.")
    if a.student not in STUDENTS:
        raise ValueError(f"unknown student {a.student!r}; choose one of {list(STUDENTS)}.")
    divisor = int(a.student[1:]) * (4 if a.small else 1)  # the small teacher is already divided by 4
    c = ml_collections.ConfigDict()
    c.task = "distill"
    c.seed = 42
    c.data = data_config(a.data, a.small, a.size or None)
    c.model = f"{a.model}/{divisor}"
    c.dropout_rate = 0.0
    c.precision = "bfloat16" if a.bf16 else "float32"
    c.init_from = ""  # students start from scratch
    c.model_init = "pytorch_default"

    c.distill = teacher_matching_config(a.method, small=a.small)
    c.distill.teacher_workdir = "workdirs/teacher_r18_small" if a.small else "workdirs/teacher_resnet"
    c.distill.taps = ("layer4",)  # the last stage's output (the paper matches VGG16's last block output)

    set_recipe(c, num_epochs=350, learning_rate=0.1, momentum=0.0, lr_decay_epochs=(150, 200, 250))

    if a.small:
        c.batch_size = 32
        c.num_epochs = 12
        c.lr_decay_epochs = (8, 11)
        c.optimizer.learning_rate = 0.05
        c.optimizer.momentum = 0.9  # as configs/vgg16_kd.py's small variant
        c.distill.beta = 10.0
        c.log_every_steps = 20
    return c
