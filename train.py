r"""Trains a model as its config says (``config.task``), resuming if the workdir holds a run.

python train.py --config configs/teacher_vgg16.py:data=synthetic,small --workdir workdirs/teacher_small
python train.py --config configs/teacher_vgg16.py --workdir workdirs/teacher --config.batch_size=32
python train.py --config configs/paper.py:demo --workdir workdirs/demo     # a whole sweep (apjax.experiment)
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apjax import cli
from apjax.tasks import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Config file, with optional :ARGS.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds narrate every step at INFO
    config = flags.FLAGS.config
    if flags.FLAGS.distributed or config.get("distributed", False):
        jax.distributed.initialize()
    with cli.one_sentence_errors(flags.FLAGS.workdir):  # a user's error (or a full disk): one sentence
        if config.task == "experiment":
            from apjax.experiment import run_sweep

            run_sweep(config, flags.FLAGS.workdir)
        else:
            train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
