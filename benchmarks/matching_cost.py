r"""Why attribution matching costs classification at the demo's scale: a grid of student recipes on seeds.

Each variant is a sweep root (``configs/paper.py:<setting>``) that trains the x2 (demo) or x8 (small)
student with the variant's methods and overrides on every seed, distilled from ONE teacher, then its
``eval`` stage. The summary gives, per variant and method, the mean and 95% Student t interval over the
seeds of the val classification at the end of training (``final_metrics.json``'s ``val``: VOC mAP, F1, the
mean logit of present and of absent classes, and ``map_cos``, the teacher-student SWA map cosine on every
val image), and Grad-CAM AUC and Cos over the (image, class) pairs at the best checkpoint (the ``eval``
stage); and the paired difference of each matching run from the KD run of its baseline variant on the
same seed.

  python -m benchmarks.matching_cost --setting demo --root /tmp/mc --teacher workdirs/demo/teacher \
      --variants kd,sswa_b10,sswa_b1 --workers 2 --out benchmarks/results/matching_cost_demo.json

``--teacher`` (a finished teacher workdir of the same setting) is linked into every root; without it the
first root trains the setting's teacher and the others link to it. The variants run in parallel
(``--workers`` processes; on one GPU, each takes ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of its memory) and
share a persistent compilation cache, so a seed after the first compiles nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from apjax.stages import base_name
from apjax.stats import mean_interval, paired_difference

# name -> (methods, overrides of the sweep config, baseline variant whose KD runs pair with these).
VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, str], str]] = {
    "kd": (("kd",), {}, "kd"),
    "sswa_b1": (("sswa",), {"kd.distill.beta": "1.0"}, "kd"),
    "sswa_b3": (("sswa",), {"kd.distill.beta": "3.0"}, "kd"),
    "sswa_b10": (("sswa",), {"kd.distill.beta": "10.0"}, "kd"),
    "sswa_b30": (("sswa",), {"kd.distill.beta": "30.0"}, "kd"),
    "sswa_b10_l2": (("sswa",), {"kd.distill.beta": "10.0", "kd.distill.matching_form": "l2"}, "kd"),
    "sswa_b10_bern": (("sswa",), {"kd.distill.beta": "10.0", "kd.distill.sswa_mode": "bernoulli"}, "kd"),
    "swa_b10": (("swa",), {"kd.distill.beta": "10.0"}, "kd"),
    "ewa_b10": (("ewa",), {"kd.distill.beta": "10.0"}, "kd"),
    # The loss gradient clipped to global norm C before the momentum step, KD alone included.
    "kd_clip1": (("kd",), {"kd.optimizer.clip_norm": "1.0"}, "kd_clip1"),
    **{
        f"sswa_b{b}_clip{c}": (
            ("sswa",),
            {"kd.distill.beta": f"{b}.0", "kd.optimizer.clip_norm": {"03": "0.3"}.get(c, c + ".0")},
            "kd_clip1",
        )
        for b, c in (("3", "1"), ("10", "1"), ("30", "1"), ("100", "1"), ("10", "03"), ("10", "3"))
    },
    # The reference's KD recipe: no momentum, lr 0.1 (the small configs use momentum 0.9, lr 0.05).
    "nomom": (("kd", "sswa"), {"kd.optimizer.momentum": "0.0", "kd.optimizer.learning_rate": "0.1"}, "nomom"),
    # Twice the epochs: does matching slow learning, or lower where it ends?
    "long": (("kd", "sswa"), {"kd.num_epochs": "16", "kd.lr_decay_epochs": "(12,)"}, "long"),
}

SETTINGS = {
    "demo": ("configs/paper.py:demo", ("x2",), {}),
    # The small variant's teacher and its smallest student, matching as the small configs do.
    "small": (
        "configs/paper.py:small",
        ("x8",),
        {"prune_kinds": "()", "quant_bits": "()", "table8_methods": "()"},
    ),
}


def _command(setting: str, root: Path, variant: str, seeds: str, only: str, extra=()) -> list[str]:
    config, students, fixed = SETTINGS[setting]
    methods, overrides, _ = VARIANTS[variant]
    args = [sys.executable, "train.py", "--config", config, "--workdir", str(root)]
    options = {
        "seeds": f"({seeds},)",
        "students": "(" + "".join(f"'{s}'," for s in students) + ")",
        "kd_methods": "(" + "".join(f"'{m}'," for m in methods) + ")",
        "only": only,
        **fixed,
        **overrides,
    }
    return args + [f"--config.{k}={v}" for k, v in options.items()] + [f"--config.{e}" for e in extra]


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - start


def _link_teacher(root: Path, teacher: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    link = root / "teacher"
    if not link.exists():
        link.symlink_to(teacher.resolve(), target_is_directory=True)


def prepare_data(setting: str, root: Path) -> None:
    """Generates and caches the setting's data once, before parallel runs would all try to."""
    from apjax.experiment import plan
    from apjax.trainer.config import load_data
    from configs import paper

    config, _, _ = SETTINGS[setting]
    teacher = plan(paper.get_config(config.split(":", 1)[1]), root)[0]  # its config carries the sweep's data
    load_data(teacher.config, ("train", "val", "segmentation_val"))


def run_grid(args) -> dict[str, dict]:
    """Trains and evaluates every variant root; returns ``{variant: {'rc', 'seconds', 'root'}}``."""
    base = Path(args.root) / args.setting
    prepare_data(args.setting, base)
    teacher = Path(args.teacher) if args.teacher else base / "_teacher" / "teacher"
    if not args.teacher and not (teacher / "final_metrics.json").exists():
        cmd = _command(args.setting, teacher.parent, "kd", args.seeds, "teacher", args.extra)
        teacher.parent.mkdir(parents=True, exist_ok=True)
        rc, sec = _run(cmd, teacher.parent / "train.log")
        print(f"teacher: rc {rc}, {sec:.0f} s", flush=True)
        if rc:
            raise SystemExit(f"the teacher failed; see {teacher.parent / 'train.log'}.")
    done: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {}
        for v in args.variants:
            root = base / v
            _link_teacher(root, teacher)
            cmd = _command(args.setting, root, v, args.seeds, "kd_*,eval", args.extra)
            futures[pool.submit(_run, cmd, root.with_suffix(".log"))] = (v, root)
        for fut in concurrent.futures.as_completed(futures):
            v, root = futures[fut]
            rc, sec = fut.result()
            done[v] = {"rc": rc, "seconds": round(sec, 1), "root": str(root)}
            print(f"{v}: rc {rc}, {sec:.0f} s", flush=True)
    return done


def _run_numbers(root: Path) -> dict[str, dict[str, float]]:
    """``{run name: metrics}`` of a finished root (its eval and each run's final val metrics)."""
    loc = json.loads((root / "eval" / "localization.json").read_text())["runs"]
    out = {}
    for name, r in loc.items():
        if not name.startswith("kd_"):
            continue
        val = json.loads((root / name / "final_metrics.json").read_text())["val"]
        g = r["methods"]["gradcam"]
        out[name] = {
            "mAP": 100 * val["mAP"],
            "F1": 100 * val["F1"],
            "logit_present": val.get("logit_present", float("nan")),
            "logit_absent": val.get("logit_absent", float("nan")),
            "map_cos": val["map_cos"],
            "AUC": 100 * g["AUC"],
            "Cos": g.get("Cos", float("nan")),
            "pairs": g.get("pairs", float("nan")),
        }
    return out


METRICS = ("mAP", "F1", "logit_present", "logit_absent", "map_cos", "AUC", "Cos", "pairs")


def _by_seed(runs: dict[str, dict], method: str) -> dict[str, dict]:
    """``{seed suffix: metrics}`` of one method's runs (``kd_x2_sswa@s1`` -> ``'@s1'``)."""
    out = {}
    for name, m in runs.items():
        stem = base_name(name)
        if stem.rsplit("_", 1)[-1] == method:
            out[name[len(stem) :]] = m
    return out


def summarize(base: Path, variants: list[str]) -> dict[str, dict]:
    """Per variant and method: mean and interval of every metric, and the paired difference from the
    baseline variant's KD runs."""
    runs = {v: _run_numbers(base / v) for v in variants if (base / v / "eval" / "localization.json").exists()}
    out: dict[str, dict] = {}
    for v, vr in runs.items():
        methods, _, baseline = VARIANTS[v]
        kd = _by_seed(runs.get(baseline, {}), "kd")
        for method in methods:
            seeds = _by_seed(vr, method)
            row = {"variant": v, "method": method, "n": len(seeds)}
            for k in METRICS:
                iv = mean_interval(m[k] for m in seeds.values())
                row[k] = None if iv is None else [iv.mean, iv.half]
                if method != "kd" and kd:
                    d = paired_difference(
                        {s: m[k] for s, m in seeds.items()}, {s: m[k] for s, m in kd.items()}
                    )
                    row[f"d_{k}"] = None if d is None else [d.mean, d.half]
            out[f"{v}/{method}"] = row
    return out


def _cell(x, digits: int) -> str:
    if x is None:
        return "-"
    mean, half = x
    return f"{mean:.{digits}f}" + ("" if np.isnan(half) else f" ± {half:.{digits}f}")


def markdown(summary: dict[str, dict]) -> str:
    cols = [
        ("mAP", 1),
        ("F1", 1),
        ("logit_present", 2),
        ("logit_absent", 2),
        ("map_cos", 3),
        ("AUC", 1),
        ("Cos", 3),
    ]
    lines = ["| variant | method | n | " + " | ".join(c for c, _ in cols) + " | d mAP | d map_cos | d AUC |"]
    lines.append("|" + "---|" * (len(cols) + 6))
    for row in summary.values():
        cells = [_cell(row[c], d) for c, d in cols]
        diffs = [_cell(row.get(f"d_{c}"), d) for c, d in (("mAP", 1), ("map_cos", 3), ("AUC", 1))]
        lines.append(
            f"| {row['variant']} | {row['method']} | {row['n']} | " + " | ".join(cells + diffs) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="demo")
    p.add_argument("--root", required=True, help="folder of the variant roots")
    p.add_argument("--teacher", default="", help="a finished teacher workdir of the setting")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2", help="seed offsets")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--summarize_only", action="store_true")
    p.add_argument("--extra", action="append", default=[], help="a further override, e.g. kd.num_epochs=1")
    p.add_argument("--out", required=True, help="the JSON file (a .md table is written beside it)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}.")
    for v in args.variants:  # a variant's KD baseline runs too
        if VARIANTS[v][2] not in args.variants:
            args.variants.append(VARIANTS[v][2])
    start = time.time()
    runs = {} if args.summarize_only else run_grid(args)
    summary = summarize(Path(args.root) / args.setting, args.variants)
    record = {
        "setting": args.setting,
        "seeds": args.seeds,
        "variants": {v: VARIANTS[v] for v in args.variants},
        "runs": runs,
        "wall_s": round(time.time() - start, 1),
        "machine": platform.node(),
        "summary": summary,
    }
    try:
        import jax

        record["devices"] = [str(d) for d in jax.devices()]
        record["jax"] = jax.__version__
    except Exception as e:  # noqa: BLE001 - the record says why it has no device list
        record["devices"] = f"unavailable: {e}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
