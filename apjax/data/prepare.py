"""Prepares PASCAL VOC 2012 for apjax from the command line (see :func:`apjax.data.voc.prepare_voc`).

    python -m apjax.data.prepare --manual_dir ~/Downloads/VOCtrainval_11-May-2012.tar \\
        --data_dir ~/tensorflow_datasets

``--manual_dir`` is the tar file itself, a folder holding it, or the extracted ``VOCdevkit`` or
``VOCdevkit/VOC2012`` folder (default: ``<data_dir>/downloads/manual``); ``--data_dir`` is tfds's data
directory, the ``config.data.data_dir`` of the configs (default ``~/tensorflow_datasets``). The prepared
splits' sizes are printed when done (the official release: train 5,717, val 5,823, segmentation_val
1,449). Running it again on a prepared ``data_dir`` only prints the sizes.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apjax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data_dir", default="~/tensorflow_datasets", help="tfds data directory (config.data.data_dir)"
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="the VOC tar, a folder holding it, or the extracted VOCdevkit or VOC2012 folder "
        "(default: <data_dir>/downloads/manual)",
    )
    args = parser.parse_args(argv)

    from apjax.data.voc import prepare_voc
    from apjax.errors import ConfigError

    try:
        sizes = prepare_voc(args.data_dir, args.manual_dir)
    except ConfigError as e:  # one sentence that says what to do (a missing or invalid VOC source)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"PASCAL VOC 2012 prepared in {args.data_dir}:")
    for split, n in sizes.items():
        print(f"  {split:<17} {n:>6,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
