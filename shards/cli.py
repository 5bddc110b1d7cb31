"""`hcsc-shards`: pack image datasets into WebDataset shards (build | verify | info).

Examples:
  hcsc-shards build --source imagefolder:/data/imagenet/train --out /data/shards --workers 16
  hcsc-shards build --source imagenet-val:/data/val,/data/val_labels.txt --out /data/shards --split val
  hcsc-shards build --source fashion-mnist: --out data/fmnist            # Debian dataset-fashion-mnist
  hcsc-shards verify /data/shards --decode
  hcsc-shards info /data/shards
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shards.build import DEFAULT_QUALITY, DEFAULT_SAMPLES_PER_SHARD, build_shards
from shards.format import ShardFormatError
from shards.manifest import BuildError
from shards.sources import SourceError
from shards.verify import summary, verify

SOURCE_HELP = """imagefolder:PATH (one sub-folder per class, ids by sorted name) |
imagenet-val:PATH,LABELS (flat folder + LABELS text file, one '<file name> <class name or id>' per line,
white space or comma separated; Kaggle's LOC_val_solution.csv works as is) |
fashion-mnist:DIR[:train|test] (gzipped idx files; DIR defaults to /usr/share/datasets/fashion-mnist,
the part to train for --split train and test otherwise)"""


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcsc-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack a source into shards + DALI index files + _info.json")
    b.add_argument("--source", required=True, help=SOURCE_HELP)
    b.add_argument("--out", required=True, help="shard folder (other splits in it are kept)")
    b.add_argument("--split", default="train", help="split name: train or val (default train)")
    b.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help="samples per tar; 1000 ImageNet JPEGs make ~110 MB shards (default %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="global shuffle seed; fixes each sample's idx")
    b.add_argument("--workers", type=int, default=_cpus(), help="processes (default: all CPUs, %(default)s)")
    b.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this (off: copy JPEGs as they are)")
    b.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help="JPEG quality for converted or re-encoded images (default %(default)s)")
    b.add_argument("--limit", type=int, default=None,
                   help="use a seeded random subset of N inputs (for tests and debugging)")
    b.add_argument("--overwrite", action="store_true", help="replace a different build of this split")
    b.add_argument("--resume", action="store_true",
                   help="only finish an interrupted build, never start a new one (rerunning the same "
                        "command without it also resumes)")
    b.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not flush the shards to disk before writing the manifest")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    v = sub.add_parser("verify", help="check counts, checksums, idx coverage and index files")
    v.add_argument("dir")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument("--split", default=None, help="check only this split")
    v.add_argument("--workers", type=int, default=_cpus(), help="processes (default %(default)s)")
    i = sub.add_parser("info", help="print a short summary of a shard folder")
    i.add_argument("dir")
    return parser


def _build(args: argparse.Namespace) -> int:
    entry = build_shards(args.source, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                         seed=args.seed, workers=args.workers, max_side=args.max_side,
                         quality=args.quality, limit=args.limit, overwrite=args.overwrite,
                         resume=args.resume, fsync=args.fsync, show_progress=not args.quiet)
    print(f"{args.out}: split {args.split!r}: {entry.num_samples} samples in {len(entry.shards)} "
          f"shards; copied {entry.copied}, converted {entry.converted or 0}, skipped {len(entry.skipped)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems = verify(args.dir, split=args.split, decode=args.decode, workers=max(1, args.workers))
    for line in problems:
        print(line)
    if not problems:
        print(f"{args.dir}: ok")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "verify":
            return _verify(args)
        print(summary(args.dir))
        return 0
    except (BuildError, SourceError, ShardFormatError) as err:
        print(f"hcsc-shards: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
