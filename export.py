r"""Exports a finished run's checkpoint for deployment (apjax.deploy): two jax.export functions and a meta.

  python export.py --workdir workdirs/demo/teacher --out exports/teacher            # the best checkpoint
  python export.py --workdir workdirs/paper/prune_s_sswa --out exports/prune_s_sswa --checkpoint latest
  python export.py --workdir workdirs/demo/kd_x2_sswa --out exports/kd_x2_sswa --overwrite

Writes predict.stablehlo (uint8 images -> logits), explain.stablehlo (-> logits and Grad-CAM maps),
weights.npz and meta.json into --out, which must not exist unless --overwrite (which replaces only an
earlier export). Load it with ``apjax.deploy.load(DIR)``, or try it with
``python -m apjax.deploy.predict DIR IMAGE...`` (docs/deploy.md).
"""

from __future__ import annotations

from absl import app, flags, logging

from apjax import cli
from apjax.deploy.export import export_run
from apjax.trainer.checkpoints import CHECKPOINTS

flags.DEFINE_string("workdir", None, "A finished training run's directory (it holds config.json).")
flags.DEFINE_string("out", None, "Folder to write the export into (must not exist, unless --overwrite).")
flags.DEFINE_enum("checkpoint", "best", list(CHECKPOINTS), "Which checkpoint to export.")
flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax narrates every step at INFO
    f = flags.FLAGS
    with cli.one_sentence_errors(f.out):  # a user's error (or a full disk) ends in one sentence
        meta = export_run(f.workdir, f.out, checkpoint=f.checkpoint, overwrite=f.overwrite)
    source = meta["source"]
    print(
        f"exported {source['workdir']} ({source['checkpoint']} checkpoint, step {source['step']}) to {f.out}:"
    )
    for name, size in meta["files"].items():
        print(f"  {name}  {size:,} bytes")
    w = meta["weights"]
    stored = f", stored as {w['storage']} in {w['stored_bytes']:,} bytes" if "storage" in w else ""
    print(f"  weights: {w['count']:,} values, {w['bytes']:,} bytes in float32{stored}")
    print(f"try it: python -m apjax.deploy.predict {f.out} IMAGE...")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
