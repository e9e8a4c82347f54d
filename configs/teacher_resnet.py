r"""Teacher: a ResNet-18 or ResNet-50 (torchvision layout, BN, 20-way head) trained with multi-label BCE.

Not a setting of the paper (its nets are VGG16s): the same data and loss as configs/teacher_vgg16.py, with
the fine-tuning recipe usual for an ImageNet ResNet (SGD momentum 0.9, lr 0.01, decayed 10x at epochs 20
and 40 of 60). On VOC, from torchvision's ImageNet weights:

  python train.py --config configs/teacher_resnet.py:model=resnet50 --workdir workdirs/teacher_r50 \
      --config.init_from=/path/to/resnet50.pth

On the synthetic benchmark's small variant (a ResNet-18 with widths / 4, 64x64 crops; a few minutes on 2
CPU cores):

  python train.py --config configs/teacher_resnet.py:data=synthetic,small --workdir workdirs/teacher_r18_small

Arguments (after the colon, comma separated): model=resnet18|resnet50, data=voc|synthetic, small, size=N,
bf16. ``--config.model`` also takes a width-divided net such as ``resnet18/2``.
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config, parse_arg, set_recipe

MODELS = ("resnet18", "resnet50")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="voc", small=False, size=0, model="resnet18", bf16=False)
    if a.model not in MODELS:
        raise ValueError(f"unknown model {a.model!r}; choose one of {list(MODELS)}.")
    c = ml_collections.ConfigDict()
    c.task = "teacher"
    c.seed = 3
    c.data = data_config(a.data, a.small, a.size or None)
    c.model = f"{a.model}/4" if a.small else a.model
    c.dropout_rate = 0.0  # torchvision's ResNets have no dropout
    c.precision = "bfloat16" if a.bf16 else "float32"
    # A torchvision ResNet state dict (.pth read without torch, or .npz of the same keys); a VOC teacher
    # without it is refused unless from_scratch.
    c.init_from = ""
    c.from_scratch = False
    c.model_init = "pytorch_default"  # what init_from does not cover (the new head); or "torchvision"

    set_recipe(c, num_epochs=60, learning_rate=0.01, momentum=0.9, lr_decay_epochs=(20, 40))

    if a.small:
        c.batch_size = 32
        c.num_epochs = 12
        c.lr_decay_epochs = (8, 11)
        c.optimizer.learning_rate = 0.05
        c.log_every_steps = 20
    return c
