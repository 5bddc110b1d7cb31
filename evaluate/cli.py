"""`hcsc-eval`: evaluate HCSC checkpoints (kNN, linear probe, clustering, import/export, report).

Every command takes our run directory, one of our checkpoint tag folders, an official HCSC
``.pth`` or an exported torchvision trunk (``report`` without ``--recluster`` only the first two:
it shows the prototypes stored with them). knn, linear, cluster and report --recluster run on
every rank under torchrun (features sharded over ranks) and in one process without a launcher; a
report of stored prototypes embeds its few images on rank 0 alone. The result is one
JSON object, the only line on stdout (rank 0); logs and progress bars go to stderr, so
``hcsc-eval knn ... | jq`` works.

Everything that can be checked before work is checked first: the values of the flags, the output
targets (an existing one is replaced only with --force), the checkpoint file, the shard folders
and their splits, the cluster counts against the split's size. A failure is one line on stderr
naming the input and what to do (exit 2), or for an unexpected error the error and the log file
holding its traceback (exit 1); --debug or HCSC_DEBUG=1 also print the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

from core.cli import EXIT_USER_ERROR, run_cli
from core.config import INTERPOLATIONS
from core.errors import first_line
from core.files import write_text_atomic
from core.install import check_faiss_build
from evaluate.checks import ArgumentError

if TYPE_CHECKING:  # the CLI imports the heavy modules lazily, so --help and flag errors are fast
    from evaluate.stored import StoredRun

COMMANDS = {
    "knn": "weighted kNN top-1/top-5 on trunk features",
    "linear": "linear probe on the frozen trunk",
    "cluster": "hierarchical k-means of val features: NMI, AMI, ARI, Hungarian accuracy",
    "import-official": "convert an official HCSC .pth into our checkpoint layout",
    "export": "export a backbone as torchvision or detectron2 weights",
    "report": "HTML report of the learned cluster hierarchy",
}
OFFLINE = ("import-official", "export")  # no data, no process group work
DEFAULT_SIZES = (224, 256)  # crop, resize (method.md §7.1) when the checkpoint does not say
# Mistakes the user can fix, reported in one line (exit 2). ValueError covers CheckpointError,
# ShardFormatError, ConfigError and ArgumentError, and the argument checks of the evaluations.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, FileExistsError, PermissionError)
N = TypeVar("N", int, float)
RECLUSTER_SPLIT, RECLUSTER_NITER, RECLUSTER_NREDO = "val", 20, 3  # `report --recluster` defaults
RECLUSTER_ONLY = ("--split", "--num-clusters", "--niter", "--nredo")  # flags of the re-clustering
REPORT_HELP = """\
By default the page shows the prototypes stored with one of our checkpoints (a run folder or a
checkpoint folder): the hierarchical clustering of the run's training split that training used
at the start of the checkpoint's epoch, every top-level cluster with its child prototypes and
their members nearest to the centroid in the momentum encoder's head space, the run's config
and training curves (metrics.jsonl), scores against the labels, a class x cluster matrix and a
PCA map of the prototypes. With --recluster it clusters a split's trunk features instead, for
any checkpoint hcsc-eval accepts."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (argparse would print the whole usage before it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _number(kind: Callable[[str], N], text: str, ok: Callable[[N], bool], need: str) -> N:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a number > 0")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def momentum(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def positive_int_list(text: str) -> list[int]:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _flags(p: argparse.ArgumentParser, force: str | None) -> None:
    if force:
        p.add_argument("--force", action="store_true", help=force)
    p.add_argument("--debug", action="store_true",
                   help="also print the traceback of a failure on the console (as HCSC_DEBUG=1 does)")


def _common(p: argparse.ArgumentParser, batch_default: int = 128, out_help: str | None = None) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint tag folder, official .pth, "
                   "or an exported torchvision trunk")
    p.add_argument("--encoder", default=None, help="encoder registry name (default: from our checkpoint's "
                   "config, else resnet50)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="center crop side, px (default: the run's data.image_size, else 224, "
                        "method.md §7.1)")
    p.add_argument("--resize", type=positive_int, default=None,
                   help="shorter side before the crop, px (default: the run's data.eval_resize, else 256)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="resize filter before the crop (default: bicubic for knn, cluster and report "
                   "--recluster, as method.md §7.1; bilinear for linear's validation, as the PCL protocol; "
                   "for a report of stored prototypes the run's data.eval_interpolation, as the "
                   "clustering's features, method.md §2.2)")
    p.add_argument("--batch-size", type=positive_int, default=batch_default, help="images per rank per step")
    p.add_argument("--backend", choices=("dali", "torch"), default="dali",
                   help="data pipeline backend (a report of stored prototypes decodes its few images with "
                        "the torch reference transform)")
    p.add_argument("--workers", type=positive_int, default=4,
                   help="DALI threads / DataLoader workers per rank (decoding threads for a report of stored "
                        "prototypes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, required=out_help is not None,
                   help=out_help or "also write the JSON result to this file")


def _shards(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--shards", required=required, default=None,
                   help="shard folder" if required else
                   "shard folder (default: the run's data.shards; required with --recluster)")


def _pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-shards", required=True, help="shard folder holding the train (bank) split")
    p.add_argument("--val-shards", required=True, help="shard folder holding the val split (may be the same)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hcsc-eval", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    replace_out = "replace an existing --out file"
    p = sub.add_parser("knn", help=COMMANDS["knn"])
    _common(p)
    _pair(p)
    p.add_argument("--k", type=positive_int_list, default=[10, 20, 100, 200],
                   help="neighbour counts (method.md §7.1)")
    p.add_argument("--T", type=positive_float, default=0.07,
                   help="vote temperature exp(s/T) (method.md §7.1: 0.07)")
    _flags(p, replace_out)

    p = sub.add_parser("linear", help=COMMANDS["linear"])
    _common(p, batch_default=256, out_help="folder for the resumable state and linear_result.json")
    _pair(p)
    p.add_argument("--epochs", type=positive_int, default=100)
    p.add_argument("--lr", type=positive_float, default=5.0)
    p.add_argument("--momentum", type=momentum, default=0.9)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--milestones", type=int_list, default=[60, 80], help="epochs where lr *= 0.1")
    _flags(p, None)  # --out is a resumable folder: a rerun continues it

    p = sub.add_parser("cluster", help=COMMANDS["cluster"])
    _common(p)
    _shards(p, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--num-clusters", type=int_list, default=[25000, 1000],
                   help="cluster counts, fine to coarse (HCSC README: 25000,1000)")
    p.add_argument("--niter", type=positive_int, default=20)
    p.add_argument("--nredo", type=positive_int, default=5)
    _flags(p, replace_out)

    p = sub.add_parser("report", help=COMMANDS["report"], description=REPORT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, out_help="folder for index.html and the PNG montages")
    p.add_argument("--recluster", action="store_true",
                   help="cluster a split's trunk features afresh instead of showing the prototypes stored "
                        "with the checkpoint (for official or exported weights, and for checkpoints of the "
                        "warm-up)")
    _shards(p, required=False)
    p.add_argument("--split", default=None,
                   help=f"--recluster: the split to cluster (default {RECLUSTER_SPLIT}); the stored "
                        "prototypes always cover the run's data.train_split")
    p.add_argument("--num-clusters", type=int_list, default=None,
                   help="--recluster: cluster counts, fine to coarse (default: about 25 images per fine "
                        "cluster and 8 fine clusters per coarse one)")
    p.add_argument("--niter", type=positive_int, default=None,
                   help=f"--recluster: Lloyd iterations per restart (default {RECLUSTER_NITER})")
    p.add_argument("--nredo", type=positive_int, default=None,
                   help=f"--recluster: k-means restarts (default {RECLUSTER_NREDO})")
    p.add_argument("--max-images", type=positive_int, default=20000,
                   help="stored prototypes: embed at most this many training images to rank the members "
                        "shown (a random subset, topped up so every shown prototype has --images candidates)")
    p.add_argument("--children", type=positive_int, default=6,
                   help="child prototypes shown per top-level cluster")
    p.add_argument("--images", type=positive_int, default=8, help="nearest images shown per prototype")
    p.add_argument("--montages", type=nonnegative_int, default=6,
                   help="write a PNG montage beside the page for this many of the largest top-level clusters")
    _flags(p, "write into an --out folder that already holds a report or other files")

    p = sub.add_parser("import-official", help=COMMANDS["import-official"])
    p.add_argument("pth", help="official HCSC checkpoint (.pth / .pth.tar)")
    p.add_argument("out", help="output file")
    _flags(p, "replace an existing output file")

    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("--format", choices=("torchvision", "detectron2"), required=True)
    p.add_argument("checkpoint", help="any checkpoint hcsc-eval accepts")
    p.add_argument("out", help="output file (.pth for torchvision, .pkl for detectron2)")
    _flags(p, "replace an existing output file")
    return parser


def _loader_args(args: argparse.Namespace, run: tuple[int, int, str] | None = None) -> dict:
    """The loader settings: flags first, then the sizes stored with our checkpoint, then 224/256.

    Args:
        run: (data.image_size, data.eval_resize, data.eval_interpolation) of the run whose stored
            prototypes the report shows: its defaults then reproduce the clustering's features
            (docs/method.md §2.2) rather than the evaluation protocol's bicubic (§7.1).
    """
    from evaluate.checkpoints import stored_eval_sizes

    stored = run[:2] if run else stored_eval_sizes(args.checkpoint)
    image_size = args.image_size or (stored or DEFAULT_SIZES)[0]
    resize = args.resize or max((stored or DEFAULT_SIZES)[1], image_size)
    if resize < image_size:  # only a typed --resize can be smaller
        origin = (f"--image-size {image_size}" if args.image_size else
                  f"the crop of {image_size} px the checkpoint's run used (see --image-size)" if stored else
                  f"the default crop of {image_size} px (see --image-size)")
        raise ArgumentError(f"--resize {resize}: smaller than {origin}; the center crop must fit in the "
                            f"resized image: pass --resize {image_size} or more, or a smaller --image-size")
    protocol = "bilinear" if args.command == "linear" else "bicubic"
    interpolation = args.interpolation or (run[2] if run else protocol)
    return {"backend": args.backend, "image_size": image_size, "resize": resize,
            "interpolation": interpolation, "batch_size": args.batch_size, "workers": args.workers}


def _splits(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(folder, split, folder flag, split flag) of every split the command reads."""
    if args.command in ("knn", "linear"):
        return [(args.train_shards, args.train_split, "--train-shards", "--train-split"),
                (args.val_shards, args.val_split, "--val-shards", "--val-split")]
    return [(args.shards, args.split, "--shards", "--split")]


def _report_flags(args: argparse.Namespace) -> None:
    """`report`: the flags of one source used with the other are refused (they would be ignored)."""
    if args.recluster:
        if args.shards is None:
            raise ArgumentError("--recluster: needs --shards, the shard folder holding the split to cluster")
        args.split = args.split or RECLUSTER_SPLIT
        args.niter = args.niter or RECLUSTER_NITER
        args.nredo = args.nredo or RECLUSTER_NREDO
        return
    for flag in RECLUSTER_ONLY:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and flag != "--split":
            typed = ",".join(map(str, value)) if isinstance(value, list) else value
            raise ArgumentError(f"{flag} {typed}: applies only with --recluster (the stored prototypes have "
                                "the run's own levels); drop it, or add --recluster to cluster a split "
                                "afresh")


def _preflight_stored(args: argparse.Namespace, loader: dict) -> tuple[dict, StoredRun]:
    """`report` without --recluster: the checkpoint's stored prototypes, the run's training split
    in the shard folder, and the same number of samples in both. Reads the checkpoint (the
    prototypes' presence is only known from inside it), but no data."""
    from evaluate import checks
    from evaluate.checkpoints import CheckpointError
    from evaluate.data import data_config
    from evaluate.stored import load_stored

    try:
        stored = load_stored(args.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"--checkpoint {err}") from None
    cfg = stored.config
    where = stored.run.config if stored.run is not None and stored.run.config.is_file() else stored.file
    if args.encoder is not None and args.encoder != cfg.model.encoder:
        raise ArgumentError(f"--encoder {args.encoder}: the stored prototypes were made by the run's own "
                            f"encoder {cfg.model.encoder!r} ({where}); drop --encoder, or add --recluster")
    split = cfg.data.train_split
    if args.split is not None and args.split != split:
        raise ArgumentError(f"--split {args.split}: the stored prototypes cluster the run's training split "
                            f"{split!r} (data.train_split); drop --split, or add --recluster to cluster "
                            f"{args.split!r} afresh")
    folder = args.shards or cfg.data.shards
    flag = "--shards" if args.shards else f"data.shards of {where} (--shards overrides it):"
    entry = checks.check_split(folder, split, folder_flag=flag,
                               split_flag="--shards" if args.shards else "data.train_split")
    assigned = int(stored.prototypes.im2cluster[0].numel())
    if entry.num_samples != assigned:
        raise ArgumentError(f"{flag} {folder}: split {split!r} has {entry.num_samples} samples, but the "
                            f"stored prototypes assign {assigned}; pass the shard folder the run trained on "
                            "with --shards")
    args.shards = folder
    data = cfg.data
    loader = _loader_args(args, (data.image_size, data.eval_resize, data.eval_interpolation))
    data_config(folder, **loader)  # what DataConfig refuses, named by the flag
    return loader, stored


def _preflight(args: argparse.Namespace) -> tuple[dict, StoredRun | None]:
    """Every check that needs no data, cheapest first; returns the loader settings (and, for a
    report of stored prototypes, the checkpoint read).

    Order: flag values, output targets, the checkpoint's file, the shard folders and splits, the
    cluster counts against the split's size. Raises one-line user errors naming the flag.
    """
    check_faiss_build()  # before the imports that load faiss
    from core import dist
    from evaluate import checks
    from evaluate.checkpoints import CheckpointError, check_checkpoint
    from evaluate.clustering import check_levels
    from evaluate.data import data_config
    from evaluate.report import default_levels
    from model.encoders import list_encoders

    if args.command in OFFLINE:
        checks.check_new_file(args.out, force=args.force)
        check_checkpoint(args.pth if args.command == "import-official" else args.checkpoint)
        return {}, None
    if args.command == "report":
        _report_flags(args)
    if args.encoder is not None and args.encoder not in list_encoders():
        raise ArgumentError(f"--encoder {args.encoder!r}: unknown encoder; choose one of {list_encoders()}")
    if args.command == "linear" and args.batch_size % dist.world():
        raise ArgumentError(f"--batch-size {args.batch_size} (global) is not divisible by {dist.world()} "
                            "ranks; pass a multiple of the number of processes")
    loader = _loader_args(args)
    if args.command == "report":
        checks.check_report_folder(args.out, force=args.force)
    elif args.command == "linear":
        checks.check_output_folder(args.out)
    elif args.out:
        checks.check_new_file(args.out, force=args.force, flag="--out")
    try:
        check_checkpoint(args.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"--checkpoint {err}") from None
    if args.command == "report" and not args.recluster:
        return _preflight_stored(args, loader)
    for folder, split, folder_flag, split_flag in _splits(args):
        entry = checks.check_split(folder, split, folder_flag=folder_flag, split_flag=split_flag)
        data_config(folder, **loader)  # what DataConfig refuses, named by the flag
        if args.command in ("cluster", "report"):
            check_levels(args.num_clusters or default_levels(entry.num_samples), entry.num_samples)
    return loader, None


def _run(args: argparse.Namespace, loader: dict, stored: StoredRun | None) -> dict:
    from evaluate import commands

    common = {"checkpoint": args.checkpoint, "encoder": args.encoder, "seed": args.seed, **loader}
    if args.command == "knn":
        return commands.run_knn(train_shards=args.train_shards, val_shards=args.val_shards,
                                train_split=args.train_split, val_split=args.val_split, ks=args.k,
                                temperature=args.T, **common)
    if args.command == "cluster":
        return commands.run_cluster(shards=args.shards, split=args.split, num_clusters=args.num_clusters,
                                    niter=args.niter, nredo=args.nredo, **common)
    if args.command == "linear":
        from evaluate.linear import LinearConfig

        protocol = LinearConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, milestones=args.milestones)
        common["batch_size"] = args.batch_size  # data_config's per-rank size is derived inside
        return commands.run_linear(train_shards=args.train_shards, val_shards=args.val_shards, out=args.out,
                                   train_split=args.train_split, val_split=args.val_split, protocol=protocol,
                                   global_batch=args.batch_size, **common)
    return _report(args, common, stored)


def _report(args: argparse.Namespace, common: dict, stored: StoredRun | None) -> dict:
    from core import dist
    from evaluate.report import build_report_data, build_stored_report, write_report

    if stored is None:
        data = build_report_data(shards=args.shards, split=args.split, num_clusters=args.num_clusters,
                                 children=args.children, images=args.images, niter=args.niter,
                                 nredo=args.nredo, **common)
    elif dist.is_main():  # no collective: ranks other than 0 have nothing to do
        data = build_stored_report(stored, shards=args.shards, children=args.children, images=args.images,
                                   max_images=args.max_images, image_size=common["image_size"],
                                   resize=common["resize"], interpolation=common["interpolation"],
                                   batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    else:
        data = None
    if data is None:
        return {}
    page = write_report(data, args.out, montages=args.montages)
    return {"command": "report", "source": data.source, "page": str(page), "checkpoint": data.checkpoint,
            "prototypes_epoch": data.prototypes_epoch, "split": data.split,
            "levels": [len(s) for s in data.sizes], "embedded": data.embedded, "scores": data.scores}


def _offline(args: argparse.Namespace) -> dict:
    from evaluate import interop

    if args.command == "import-official":
        return {"command": "import-official", "out": args.out, **interop.import_official(args.pth, args.out)}
    export = interop.export_torchvision if args.format == "torchvision" else interop.export_detectron2
    keys = export(args.checkpoint, args.out)
    return {"command": "export", "format": args.format, "out": args.out, "keys": keys}


def _log_to_stderr() -> None:
    """`core.logs.setup_logging`, with rank 0's console handler on stderr: stdout is the result's."""
    from core.logs import setup_logging

    setup_logging(None, console=sys.stderr)


def _command(args: argparse.Namespace) -> int:
    from core import dist
    from evaluate.checkpoints import CheckpointError

    dist.init()
    try:
        _log_to_stderr()
        loader, stored = _preflight(args)
        if args.command in OFFLINE:
            result = _offline(args)
        else:
            try:
                result = _run(args, loader, stored)
            except CheckpointError as err:  # weights that do not fit: name the flag they came from
                raise CheckpointError(f"--checkpoint {first_line(err)}") from err
        if dist.is_main() and result:
            if args.command in ("knn", "cluster") and args.out:
                write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
            print(json.dumps(result), flush=True)
    finally:
        dist.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed in one line
        return stop.code if isinstance(stop.code, int) else EXIT_USER_ERROR
    left = {"linear": "nothing was left half-written; the same command resumes after the last finished epoch",
            "report": "nothing was left half-written; montages already written stay in --out (rerun with "
                      "--force)"}.get(args.command, "nothing was left half-written")
    return run_cli(f"hcsc-eval {args.command}", lambda: _command(args), user_errors=USER_ERRORS,
                   debug=args.debug, interrupted=left)


if __name__ == "__main__":
    sys.exit(main())
