r"""Localisation report throughput, (run, method, pair) triples per second, on 8 CPU devices.

Trains a tiny teacher once (synthetic benchmark, VGG16/8 at 64x64) into ``--root``, copies it as a
student, then times ``apjax.evaluation.localization_report`` of the two (compiles, classification and
maps included; no figures) with whatever ``apjax`` is on the path, so the same script measures two
versions:

  PYTHONPATH=/work/main python benchmarks/localization_benchmark.py --label before   # the old code
  PYTHONPATH=. python benchmarks/localization_benchmark.py --label after

Writes ``benchmarks/results/localization_pairs.json`` (one entry per label) and a Markdown line per label
to ``localization_pairs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def predict_every_class(workdir: Path) -> None:
    """Raises the head's biases by 10 in a new best checkpoint: a one-epoch net predicts little, and the
    benchmark wants every class present in a mask to make a pair."""
    from apjax.trainer.checkpoints import Checkpoints, restore_state
    from apjax.trainer.files import load_workdir_config

    _, state, meta = restore_state(load_workdir_config(workdir), workdir, "best")
    params = jax.tree.map(lambda x: x, state.params)
    params["head"]["bias"] = params["head"]["bias"] + 10.0
    checkpoints = Checkpoints(workdir)
    checkpoints.save_best(state.replace(params=params), {**dict(meta), "step": int(meta["step"]) + 1})
    checkpoints.close()


def tiny_runs(root: Path) -> list[Path]:
    """A teacher trained for one epoch and an identical student (its copy), trained once."""
    from apjax.tasks import train_and_evaluate
    from configs import teacher_vgg16

    teacher, student = root / "teacher", root / "student"
    if not (teacher / "final_metrics.json").exists():
        c = teacher_vgg16.get_config("data=synthetic,small")
        c.data.data_dir = str(root / "data")
        c.data.split_sizes.update(dict(train=96, val=32, segmentation_val=96))
        c.model, c.batch_size, c.num_epochs, c.lr_decay_epochs = "vgg16/8", 32, 1, ()
        train_and_evaluate(c, teacher)
        predict_every_class(teacher)
    if not student.exists():
        shutil.copytree(teacher, student)
    return [teacher, student]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="name of the measured version, e.g. before or after")
    p.add_argument("--root", default="/tmp/apjax_localization_benchmark", help="where the tiny runs live")
    p.add_argument("--methods", default="gradcam,gradient")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    import apjax
    from apjax import evaluation

    workdirs = tiny_runs(Path(args.root))
    methods = tuple(args.methods.split(","))
    t0 = time.perf_counter()
    results = evaluation.localization_report(
        workdirs,
        methods=methods,
        out_dir=Path(args.root) / f"report_{args.label}",
        batch_size=args.batch_size,
        figure_images=0,
    )
    seconds = time.perf_counter() - t0
    triples = sum(r["pairs"] for r in results["runs"].values()) * len(methods)
    entry = {
        "apjax": str(Path(apjax.__file__).parent),
        "devices": jax.device_count(),
        "methods": list(methods),
        "runs": len(workdirs),
        "pairs_per_run": {n: r["pairs"] for n, r in results["runs"].items()},
        "report_seconds": round(seconds, 2),
        "pairs_per_s": round(triples / seconds, 2),
        "in_report_pairs_per_s": {
            n: {m: r["methods"][m]["pairs_per_s"] for m in methods} for n, r in results["runs"].items()
        },
        "AUC": {n: {m: r["methods"][m]["AUC"] for m in methods} for n, r in results["runs"].items()},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "localization_pairs.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[args.label] = entry
    path.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    lines = [
        f"| {label} | {e['devices']} | {e['runs']} x {len(e['methods'])} methods x "
        f"{max(e['pairs_per_run'].values())} pairs | {e['report_seconds']} s | {e['pairs_per_s']} pairs/s |"
        for label, e in saved.items()
    ]
    head = "| code | CPU devices | work | report wall time | (run, method, pair)/s |\n|---|---|---|---|---|\n"
    (RESULTS / "localization_pairs.md").write_text(head + "\n".join(lines) + "\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
