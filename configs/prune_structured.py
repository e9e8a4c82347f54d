r"""Attribution-preserving structured pruning of the VGG16 teacher (SPEC section 6, the paper's Tables 6-7).

One-shot L1-norm filter pruning: in conv1_1 and conv4_1..conv5_3 only the int(C * (1 - 0.7)) filters with
the largest sum |w| are kept, as the reference counts them (19 of 64, 153 of 512), and the net is rebuilt
smaller (3,269,153 parameters from 15,224,916, the paper's 3.27M; the kept filters' BN entries, the next
conv's input channels and the head's rows carried over), then fine-tuned
30 epochs (SGD momentum 0.9, lr 1e-3 constant) with BCE + beta * matching against the unpruned teacher.
The paper reports on VOC: naive mAP 83.76, Grad-CAM AUC 79.98, cosine 0.764; SSWA 89.07, 88.34, 0.910.

  python train.py --config configs/prune_structured.py:method=sswa --workdir workdirs/prune_s_sswa \
      --config.distill.teacher_workdir=workdirs/teacher

The pruned widths are saved in <workdir>/model.json; eval.py loads the smaller net from it.

On the synthetic benchmark's small variant (after the small teacher of configs/teacher_vgg16.py):

  python train.py --config configs/prune_structured.py:data=synthetic,small,method=naive \
      --workdir workdirs/prune_s_naive_small

Arguments (after the colon): method=naive|ewa|swa|sswa, ratio=P, data=voc|synthetic, small, bf16, size=N.
"""

from __future__ import annotations

import ml_collections

from apjax.compress.structured import VGG16_PRUNED_LAYERS
from configs.common import parse_arg, pruning_config, set_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="voc", small=False, size=0, method="sswa", ratio=0.7, bf16=False)
    c = pruning_config("prune_structured", a)
    c.prune.ratio = float(a.ratio)  # fraction of filters removed in each pruned conv
    c.prune.pattern = VGG16_PRUNED_LAYERS  # 1 = this conv is pruned (conv1_1 .. conv5_3)

    set_recipe(c, num_epochs=30, learning_rate=1e-3, momentum=0.9)  # constant learning rate

    if a.small:
        c.num_epochs = 3
        c.dropout_rate = 0.0  # as the small teacher
        c.batch_size = 32
        c.optimizer.learning_rate = 0.01  # a short schedule: recover faster than 1e-3 would
        c.distill.beta = 10.0  # as the small distillation variant
        c.log_every_steps = 20
    return c
