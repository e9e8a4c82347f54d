r"""Evaluates trained runs: classification metrics of a checkpoint, and localisation of attribution maps.

  python eval.py --workdir workdirs/teacher_small                     # best checkpoint, val mAP/F1
  python eval.py --workdir workdirs/teacher_small --checkpoint latest --split train
  python eval.py --workdir workdirs/teacher_small --workdir workdirs/kd_small --workdir workdirs/sswa_small \
      --methods gradcam,excitation_bp,lrp,rap --out results/kd_small

With --methods (or several --workdir, the teacher first), writes the localisation report: a JSON of every
number, a Markdown table in the layout of the paper's Tables 2 and 8, and one PNG figure per method.
The runs' own config.json files are used unless --config is given.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apjax import cli, evaluation
from apjax.localization_table import localization_table
from apjax.trainer.checkpoints import CHECKPOINTS
from apjax.trainer.evaluation import CLASSIFICATION_PERCENT
from apjax.trainer.metrics_log import format_table

config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's config.json).")
flags.DEFINE_multi_string(
    "workdir", None, "A training run's directory; repeat for a teacher and its students."
)
flags.DEFINE_enum("checkpoint", "best", list(CHECKPOINTS), "Which checkpoint to evaluate.")
flags.DEFINE_string("split", "val", "Split for classification metrics: train, val or segmentation_val.")
flags.DEFINE_list("methods", [], "Attribution methods for localisation, e.g. gradcam,excitation_bp,lrp,rap.")
flags.DEFINE_string(
    "out", None, "Folder for the localisation report (default: <first workdir>/localization)."
)
flags.DEFINE_float("tolerance", 0.0, "Pointing-game tolerance in pixels (TorchRay uses 15).")
flags.DEFINE_integer("batch_size", 32, "Pairs per attribution batch.")
flags.DEFINE_integer("figure_images", 6, "Images per figure.")
flags.DEFINE_integer("ig_steps", 32, "Integrated Gradients steps.")
flags.DEFINE_integer("smoothgrad_samples", 16, "SmoothGrad samples.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-process runs).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds narrate every step at INFO
    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    try:
        if f.methods or len(f.workdir) > 1:
            results = evaluation.localization_report(
                f.workdir,
                methods=tuple(f.methods or ["gradcam"]),
                out_dir=f.out,
                which=f.checkpoint,
                batch_size=f.batch_size,
                tolerance=f.tolerance,
                figure_images=f.figure_images,
                ig_steps=f.ig_steps,
                smoothgrad_samples=f.smoothgrad_samples,
            )
            if jax.process_index() == 0:
                from apjax.attribution.methods import LABELS

                print(localization_table(results, LABELS))
                out = f.out or os.path.join(f.workdir[0], "localization")
                print(f"written to {out}/localization.json, localization.md and figures/")
            return
        result = evaluation.evaluate_workdir(f.workdir[0], f.checkpoint, f.split, config=f.config)
    except Exception as e:  # a user's error (or a full disk) ends in one sentence
        if os.environ.get("APJAX_DEBUG") or not cli.is_user_error(e):
            raise
        message = cli.error_message(e, f.out or f.workdir[0])
        sys.exit(f"error: {message}\n(set APJAX_DEBUG=1 to see the traceback)")
    if jax.process_index() == 0:
        metrics = {k: result[k] for k in (*CLASSIFICATION_PERCENT, "bce")}
        name = f"{f.split} ({f.checkpoint}, step {result['step']})"
        print(format_table({name: metrics}, percent=CLASSIFICATION_PERCENT))
        print(f"written to {os.path.join(f.workdir[0], f'eval_{f.checkpoint}_{f.split}.json')}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
