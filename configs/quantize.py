r"""Attribution-preserving quantization-aware training (issue 15 part 2; not in the paper).

A trained float network (the teacher itself, or a distilled student: ``config.quant.source_workdir``) is
quantized with qwix (apjax.compress.quantize: ``bits=int8``, int8 weights and activations; ``bits=int4w``,
int4 weights and float activations) and fine-tuned with BCE + beta * matching against the float teacher
(``config.distill.teacher_workdir``, eval mode), methods naive|ewa|swa|sswa as in pruning. There is no
published recipe: the pruning fine-tune's is used (SGD momentum 0.9, lr 1e-3 constant, 30 epochs).

  python train.py --config configs/quantize.py:bits=int8,method=sswa --workdir workdirs/quant_int8_sswa \
      --config.distill.teacher_workdir=workdirs/teacher
  # a distilled student instead of the teacher (config.model must be the student's):
  python train.py --config configs/quantize.py:bits=int4w,method=sswa --workdir workdirs/quant_x8_int4w \
      --config.distill.teacher_workdir=workdirs/teacher --config.quant.source_workdir=workdirs/kd_x8_sswa \
      --config.model=vgg16/8

On the synthetic benchmark's small variant (after the small teacher of configs/teacher_vgg16.py):

  python train.py --config configs/quantize.py:data=synthetic,small,bits=int8,method=naive \
      --workdir workdirs/quant_int8_naive_small

Arguments (after the colon): bits=int8|int4w, method=naive|ewa|swa|sswa, data=voc|synthetic, small, bf16,
size=N.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg, pruning_config, set_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="voc", small=False, size=0, method="sswa", bits="int8", bf16=False)
    c = pruning_config("quantize", a)  # the teacher's model, the data, the teacher and matching block
    del c["prune"]
    c.quant = ml_collections.ConfigDict()
    c.quant.bits = a.bits  # apjax.models.quantized.QUANT_SCHEMES: int8 (weights + activations), int4w
    c.quant.source_workdir = ""  # the run to quantize; empty: the teacher (config.distill.teacher_workdir)

    set_recipe(c, num_epochs=30, learning_rate=1e-3, momentum=0.9)

    if a.small:
        c.num_epochs = 2
        c.dropout_rate = 0.0  # as the small teacher
        c.batch_size = 32
        # Fine-tuning a converged net: 1e-3 as the pruning recipe (0.01, the small pruning variant's, moved
        # the demo teacher's maps and, with matching, cost it classification: docs/results.md, Quantization).
        c.optimizer.learning_rate = 1e-3
        c.distill.beta = 10.0  # as the small distillation variant
        c.log_every_steps = 20
    return c
