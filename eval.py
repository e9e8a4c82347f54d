r"""Evaluates a training run's checkpoint: classification metrics on a split, as a table and a JSON file.

  python eval.py --workdir workdirs/teacher_small               # best checkpoint on val
  python eval.py --workdir workdirs/teacher_small --checkpoint latest --split train

The run's own config.json is used unless --config is given.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apjax import eval_lib, train_lib

config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's config.json).")
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_enum("checkpoint", "best", list(eval_lib.CHECKPOINTS), "Which checkpoint to evaluate.")
flags.DEFINE_string("split", "val", "Split to evaluate: train, val or segmentation_val.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-process runs).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds narrate every step at INFO
    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    try:
        result = eval_lib.evaluate_workdir(f.workdir, f.checkpoint, f.split, config=f.config)
    except train_lib.USER_ERRORS as e:
        if os.environ.get("APJAX_DEBUG"):
            raise
        sys.exit(f"error: {e}\n(set APJAX_DEBUG=1 to see the traceback)")
    if jax.process_index() == 0:
        metrics = {k: result[k] for k in ("mAP", "per_image_AP", "F1", "bce")}
        name = f"{f.split} ({f.checkpoint}, step {result['step']})"
        print(train_lib.format_table({name: metrics}, percent=train_lib.CLASSIFICATION_PERCENT))
        print(f"written to {os.path.join(f.workdir, f'eval_{f.checkpoint}_{f.split}.json')}")


if __name__ == "__main__":
    app.run(main)
