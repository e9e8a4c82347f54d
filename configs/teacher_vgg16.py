r"""Teacher: VGG16 (BN) trained with multi-label BCE, the reference's recipe (SPEC section 6).

Paper setting (PASCAL VOC 2012, 227x227, ImageNet vgg16_bn init; expect val mAP about 91.8 as in the
paper's Table 2):

  python train.py --config configs/teacher_vgg16.py --workdir workdirs/teacher \
      --config.init_from=/path/to/vgg16_bn.pth

On this laptop-sized synthetic benchmark (64x64 crops of 72x72 images, 10 classes, VGG16/4 widths; 10 to
14 minutes on 2 CPU cores; expect a val mAP around 65%, far above the ~15% of chance; measured 64.8 with
--config.model_init=torchvision, the default before the reference's init became it):

  python train.py --config configs/teacher_vgg16.py:data=synthetic,small --workdir workdirs/teacher_small

Arguments (after the colon, comma separated): data=voc|synthetic, small (CPU-sized variant),
size=N (input side), model=vgg16|vgg16/2|vgg16/4|vgg16/8, bf16 (bfloat16 computation).
Any field can also be overridden on the command line, e.g. ``--config.batch_size=32``.
"""

from __future__ import annotations

import ml_collections

from configs.common import data_config, parse_arg, set_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="voc", small=False, size=0, model="", bf16=False)
    c = ml_collections.ConfigDict()
    c.task = "teacher"
    c.seed = 3  # the reference's teacher seed
    c.data = data_config(a.data, a.small, a.size or None)
    c.model = a.model or ("vgg16/4" if a.small else "vgg16")
    c.dropout_rate = 0.5
    c.precision = "bfloat16" if a.bf16 else "float32"  # computation; parameters stay float32
    # A torchvision vgg16_bn state dict (.pth, read without torch, or .npz of the same keys): the paper's
    # teacher starts from ImageNet weights, so a VOC teacher without it is refused unless from_scratch.
    c.init_from = ""
    c.from_scratch = False  # VOC: train the teacher from scratch on purpose (not the paper's setting)
    # The reference's init of what init_from does not cover (its new head; everything when from scratch):
    # torch's default layer init; "torchvision" is torchvision's kaiming-normal VGG init.
    c.model_init = "pytorch_default"

    set_recipe(c, num_epochs=60, learning_rate=0.1, momentum=0.9, lr_decay_epochs=(10, 30, 40))

    if a.small:
        c.batch_size = 32
        c.num_epochs = 12
        c.lr_decay_epochs = (8, 11)
        c.optimizer.learning_rate = 0.05
        c.dropout_rate = 0.0  # on a 2x2x64 feature map, dropout slows learning more than it helps
        c.log_every_steps = 20
    return c
