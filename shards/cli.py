"""`hcsc-shards`: pack image datasets into WebDataset shards (build | verify | info).

Examples:
  hcsc-shards build --source imagefolder:/data/imagenet/train --out /data/shards --workers 16
  hcsc-shards build --source imagenet-val:/data/val,/data/val_labels.txt --out /data/shards --split val
  hcsc-shards build --source fashion-mnist: --out data/fmnist            # Debian dataset-fashion-mnist
  hcsc-shards verify /data/shards --decode   # ends with a summary and the command that repairs
  hcsc-shards info /data/shards

The same build command again resumes an interrupted build, or checks a finished one and rewrites
only the shards that no longer match the manifest. Every failure is one line on stderr: exit 2 for
a mistake in the command, 1 for an unexpected error (traceback in the log file the line names;
--debug or HCSC_DEBUG=1 prints it too), 130 for Ctrl-C (the build resumes where it stopped).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from core.cli import EXIT_USER_ERROR, UserError, run_cli
from core.logs import setup_logging
from shards.build import DEFAULT_QUALITY, DEFAULT_SAMPLES_PER_SHARD, BuildResult, build_split
from shards.format import ShardFormatError
from shards.manifest import BuildError
from shards.sources import SourceError
from shards.verify import FolderReport, check_folder, summary

PROG = "hcsc-shards"
USER_ERRORS = (BuildError, SourceError, ShardFormatError)
MAX_PRINTED = 50  # problem lines verify prints before its summary (the rest are counted)

SOURCE_HELP = """imagefolder:PATH (one sub-folder per class, ids by sorted name) |
imagenet-val:PATH,LABELS (flat folder + LABELS text file, one '<file name> <class name or id>' per line,
white space or comma separated; Kaggle's LOC_val_solution.csv works as is) |
fashion-mnist:DIR[:train|test] (gzipped idx files; DIR defaults to /usr/share/datasets/fashion-mnist,
the part to train for --split train and test otherwise)"""
SPLIT_HELP = ("split name: letters, digits and '_' (default %(default)s); the trainer reads the splits "
              "named by its config keys data.train_split (default train) and data.val_split "
              "(default val)")
DEBUG_HELP = "on failure also print the traceback (as HCSC_DEBUG=1 does)"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pack a source into shards + DALI index files + _info.json; run on a "
                                     "finished build, it rewrites the shards that no longer match it")
    b.add_argument("--source", required=True, help=SOURCE_HELP)
    b.add_argument("--out", required=True, help="shard folder (other splits in it are kept)")
    b.add_argument("--split", default="train", help=SPLIT_HELP)
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
    v = sub.add_parser("verify", help="check counts, checksums, idx coverage and index files; print the "
                                      "command that repairs what is bad")
    v.add_argument("dir")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument("--split", default=None, help="check only this split")
    v.add_argument("--workers", type=int, default=_cpus(), help="processes (default %(default)s)")
    i = sub.add_parser("info", help="print a short summary of a shard folder")
    i.add_argument("dir")
    for command in (b, v, i):  # --debug after the command too; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _build(args: argparse.Namespace) -> int:
    result = build_split(args.source, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                         seed=args.seed, workers=args.workers, max_side=args.max_side,
                         quality=args.quality, limit=args.limit, overwrite=args.overwrite,
                         resume=args.resume, fsync=args.fsync, show_progress=not args.quiet)
    print(_build_line(args.out, args.split, result))
    return 0


def _build_line(out: str, split: str, result: BuildResult) -> str:
    entry = result.entry
    if result.checked and not result.written:
        return f"{out}: split {split!r} up to date: {result.checked} shards checked"
    if result.checked:
        return (f"{out}: split {split!r}: rewrote {len(result.written)} of {result.checked} shards "
                f"({', '.join(result.written)}); the others match the manifest")
    return (f"{out}: split {split!r}: {entry.num_samples} samples in {len(entry.shards)} "
            f"shards; copied {entry.copied}, converted {entry.converted or 0}, skipped {len(entry.skipped)}")


def _verify(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    report = check_folder(args.dir, split=args.split, decode=args.decode, workers=args.workers)
    for line in _verify_lines(report):
        print(line)
    return 1 if report.problems else 0


def _verify_lines(report: FolderReport) -> list[str]:
    """The problems (at most MAX_PRINTED), the summary, and the repair command of each bad split."""
    problems = report.problems
    lines = problems[:MAX_PRINTED]
    if len(problems) > MAX_PRINTED:
        lines.append(f"... and {len(problems) - MAX_PRINTED} more problems")
    lines.append(report.summary())
    for split in report.splits:
        if split.command and split.command.endswith("--overwrite"):
            lines.append(f"the manifest of split {split.split!r} disagrees with its shards; "
                         f"rebuild it: {split.command}")
        elif split.command:
            lines.append(f"repair: {split.command}")
        if split.stray:
            lines.append(f"not part of split {split.split!r}, move away: {', '.join(split.stray)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else EXIT_USER_ERROR
    setup_logging(None, rank=0, console=sys.stderr)
    if args.command == "build":
        body, interrupted = (lambda: _build(args)), (
            f"finished shards of split {args.split!r} are kept in {args.out}; rerun the same command "
            "to continue the build")
    elif args.command == "verify":
        body, interrupted = (lambda: _verify(args)), "nothing was changed"
    else:
        body, interrupted = (lambda: _info(args)), "nothing was changed"
    return run_cli(PROG, body, user_errors=USER_ERRORS, debug=args.debug, interrupted=interrupted)


def _info(args: argparse.Namespace) -> int:
    print(summary(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
