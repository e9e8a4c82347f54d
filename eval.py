r"""Evaluates trained runs: classification metrics of a checkpoint, and localisation of attribution maps.

  python eval.py --workdir workdirs/teacher_small                     # best checkpoint, val mAP/F1
  python eval.py --workdir workdirs/teacher_small --checkpoint latest --split train
  python eval.py --workdir workdirs/teacher_small --workdir workdirs/kd_small --workdir workdirs/sswa_small \
      --methods gradcam,excitation_bp,lrp,rap --out results/kd_small
  python eval.py --workdir workdirs/teacher_small --workdir workdirs/kd_small \
      --methods rise,occlusion --method_options rise_masks=2000    # black-box maps (probabilities only)

  python eval.py --workdir workdirs/kd_small --evals localization,similarity

With --methods (or several --workdir, the teacher first, or --faithfulness), writes the localisation report:
a JSON of every number, a Markdown table in the layout of the paper's Tables 2 and 8, and one PNG figure per
method; --faithfulness adds each run's deletion and insertion AUC and MoRF AOPC (region perturbation).
With --evals, runs those evaluators (apjax.evaluators: classification, localization, similarity,
faithfulness) on the checkpoint, each with the options of the run's config.evals.<name> (or its defaults;
override them with --config), and writes evals_<checkpoint>.json. The runs' own config.json files are
used unless --config is given.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apjax import cli, evaluation, evaluators
from apjax.attribution.methods import attribution_methods, method_label
from apjax.errors import ConfigError
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
flags.DEFINE_list(
    "methods", [], f"Attribution methods for localisation, of {','.join(attribution_methods())}."
)
flags.DEFINE_list("evals", [], f"Evaluators to run on the checkpoint, of {','.join(evaluators.EVALUATORS)}.")
flags.DEFINE_string(
    "out", None, "Folder for the localisation report (default: <first workdir>/localization)."
)
flags.DEFINE_float("tolerance", 0.0, "Pointing-game tolerance in pixels (TorchRay uses 15).")
flags.DEFINE_integer("batch_size", 32, "Pairs per attribution batch.")
flags.DEFINE_integer("figure_images", 6, "Images per figure.")
flags.DEFINE_integer("ig_steps", 32, "Integrated Gradients steps.")
flags.DEFINE_integer("smoothgrad_samples", 16, "SmoothGrad samples.")
flags.DEFINE_list(
    "method_options",
    [],
    "Other settings of the attribution methods as key=value (fields of "
    "apjax.attribution.methods.MethodOptions), e.g. rise_masks=6000,occlusion_size=16.",
)
flags.DEFINE_bool(
    "faithfulness",
    False,
    "Add each run's deletion and insertion AUC and MoRF AOPC (its own maps on its own model) to the "
    "localisation report.",
)
flags.DEFINE_integer("faithfulness_steps", 32, "Points of a deletion or insertion curve, minus one.")
flags.DEFINE_integer(
    "faithfulness_region_size", None, "MoRF's square regions, pixels (default: round(9 * image size / 227))."
)
flags.DEFINE_integer("faithfulness_regions", 64, "MoRF's regions perturbed, L (all if there are fewer).")
flags.DEFINE_enum(
    "faithfulness_region_baseline",
    "uniform",
    ["uniform", "zero", "blur"],
    "What MoRF's perturbed regions become: uniform noise over each channel's range, zero or the blur.",
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-process runs).")
flags.mark_flags_as_required(["workdir"])


def _key_values(items: list[str]) -> dict[str, str]:
    """``['a=1', 'b=2']`` -> ``{'a': '1', 'b': '2'}``; ``ConfigError`` for an item without ``=``."""
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"--method_options takes key=value items, not {bad}.")
    return dict(item.split("=", 1) for item in items)


def _faithfulness_settings(f) -> dict:
    """The faithfulness evaluator's options: ``steps`` and the MoRF settings given on the command line."""
    region = ("region_size", "regions", "region_baseline")
    given = {k: f[f"faithfulness_{k}"].value for k in region if f[f"faithfulness_{k}"].present}
    return {"steps": f.faithfulness_steps, **given}


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax and tfds narrate every step at INFO
    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    with cli.one_sentence_errors(f.out or f.workdir[0]):  # a user's error (or a full disk): one sentence
        if f.methods or len(f.workdir) > 1 or f.faithfulness:
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
                method_options=_key_values(f.method_options),
                faithfulness=_faithfulness_settings(f) if f.faithfulness else None,
            )
            if jax.process_index() == 0:
                print(localization_table(results, {m: method_label(m) for m in results["methods"]}))
                out = f.out or os.path.join(f.workdir[0], "localization")
                print(f"written to {out}/localization.json, localization.md and figures/")
            return
        if f.evals:
            result = evaluation.run_evaluators(f.workdir[0], f.evals, f.checkpoint, config=f.config)
            if jax.process_index() == 0:
                for k, v in result["evals"].items():
                    print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
                print(f"written to {os.path.join(f.workdir[0], f'evals_{f.checkpoint}.json')}")
            return
        result = evaluation.evaluate_workdir(f.workdir[0], f.checkpoint, f.split, config=f.config)
    if jax.process_index() == 0:
        metrics = {k: result[k] for k in (*CLASSIFICATION_PERCENT, "bce")}
        name = f"{f.split} ({f.checkpoint}, step {result['step']})"
        print(format_table({name: metrics}, percent=CLASSIFICATION_PERCENT))
        print(f"written to {os.path.join(f.workdir[0], f'eval_{f.checkpoint}_{f.split}.json')}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
