r"""Attribution-preserving unstructured pruning of the VGG16 teacher (SPEC section 6, the paper's Tables 4-5).

Iterative global magnitude pruning: round r prunes to global sparsity 1 - 0.8^r over all conv kernels
(one threshold; Dense and BN untouched), then fine-tunes 30 epochs (SGD momentum 0.9, lr 1e-3 constant)
from the previous round's weights with BCE + beta * matching against the unpruned teacher in eval mode.
16 rounds leave about 0.8^16 of the conv weights. The paper reports on VOC: naive mAP 87.42, Grad-CAM AUC
84.13, cosine to the teacher 0.790; SSWA 89.96, 88.45, 0.920.

  python train.py --config configs/prune_unstructured.py:method=sswa --workdir workdirs/prune_u_sswa \
      --config.distill.teacher_workdir=workdirs/teacher

Each round is a complete run in <workdir>/round_XX; a finished round is skipped when the command is run
again. eval.py --workdir <workdir> evaluates the last round.

On the synthetic benchmark's small variant (after the small teacher of configs/teacher_vgg16.py), a
shortened schedule: 4 rounds of 1 epoch at rate 0.5 (sparsity 50%, 75%, 87.5%, 93.75%):

  python train.py --config configs/prune_unstructured.py:data=synthetic,small,method=naive \
      --workdir workdirs/prune_u_naive_small

Arguments (after the colon): method=naive|ewa|swa|sswa, data=voc|synthetic, small, bf16, size=N.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg, pruning_config, set_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, data="voc", small=False, size=0, method="sswa", bf16=False)
    c = pruning_config("prune_unstructured", a)
    c.prune.rounds = 16
    c.prune.rate = 0.2  # round r keeps (1 - rate)^r of the conv weights

    # One round's fine-tuning (a fresh optimizer every round), constant learning rate.
    set_recipe(c, num_epochs=30, learning_rate=1e-3, momentum=0.9)

    if a.small:
        c.prune.rounds = 4
        c.prune.rate = 0.5
        c.num_epochs = 1
        c.dropout_rate = 0.0  # as the small teacher
        c.batch_size = 32
        c.optimizer.learning_rate = 0.01  # one short epoch per round: recover faster than 1e-3 would
        c.distill.beta = 10.0  # as the small distillation variant
        c.log_every_steps = 20
    return c
