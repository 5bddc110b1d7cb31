"""`hcsc-eval`: evaluate HCSC checkpoints (kNN, linear probe, clustering, import/export, report).

Every command takes our run directory, one of our checkpoint tag folders, an official HCSC
``.pth`` or an exported torchvision trunk. knn, linear, cluster and report run on every rank under
torchrun (features sharded over ranks) and in one process without a launcher. Results are printed
as one JSON object on the last line of stdout (rank 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.config import INTERPOLATIONS
from core.files import write_text_atomic

COMMANDS = {
    "knn": "weighted kNN top-1/top-5 on trunk features",
    "linear": "linear probe on the frozen trunk",
    "cluster": "hierarchical k-means of val features: NMI, AMI, ARI, Hungarian accuracy",
    "import-official": "convert an official HCSC .pth into our checkpoint layout",
    "export": "export a backbone as torchvision or detectron2 weights",
    "report": "HTML report of the learned cluster hierarchy",
}


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _common(p: argparse.ArgumentParser, batch_default: int = 128, out_help: str | None = None) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint tag folder, official .pth, "
                   "or an exported torchvision trunk")
    p.add_argument("--encoder", default=None, help="encoder registry name (default: from our checkpoint's "
                   "config, else resnet50)")
    p.add_argument("--image-size", type=int, default=None,
                   help="center crop side, px (default: the run's data.image_size, else 224, "
                        "method.md §7.1)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before the crop, px (default: the run's data.eval_resize, else 256)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="resize filter before the crop (default: bicubic for knn, cluster and report, "
                   "as method.md §7.1; bilinear for linear's validation, as the PCL protocol)")
    p.add_argument("--batch-size", type=int, default=batch_default, help="images per rank per step")
    p.add_argument("--backend", choices=("dali", "torch"), default="dali", help="data pipeline backend")
    p.add_argument("--workers", type=int, default=4, help="DALI threads / DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, required=out_help is not None,
                   help=out_help or "also write the JSON result to this file")


def _pair(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-shards", required=True, help="shard folder holding the train (bank) split")
    p.add_argument("--val-shards", required=True, help="shard folder holding the val split (may be the same)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcsc-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("knn", help=COMMANDS["knn"])
    _common(p)
    _pair(p)
    p.add_argument("--k", type=int_list, default=[10, 20, 100, 200], help="neighbour counts (method.md §7.1)")
    p.add_argument("--T", type=float, default=0.07, help="vote temperature exp(s/T) (method.md §7.1: 0.07)")

    p = sub.add_parser("linear", help=COMMANDS["linear"])
    _common(p, batch_default=256, out_help="folder for the resumable state and linear_result.json")
    _pair(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--milestones", type=int_list, default=[60, 80], help="epochs where lr *= 0.1")

    for name in ("cluster", "report"):
        p = sub.add_parser(name, help=COMMANDS[name])
        _common(p, out_help="folder for index.html and the PNG montages" if name == "report" else None)
        p.add_argument("--shards", required=True, help="shard folder")
        p.add_argument("--split", default="val")
        p.add_argument("--num-clusters", type=int_list, default=None if name == "report" else [25000, 1000],
                       help="cluster counts, fine to coarse (HCSC README: 25000,1000)")
        p.add_argument("--niter", type=int, default=20)
        p.add_argument("--nredo", type=int, default=5 if name == "cluster" else 3)
    p.add_argument("--top-clusters", type=int, default=6, help="top-level clusters shown")
    p.add_argument("--children", type=int, default=6, help="child prototypes shown per top cluster")
    p.add_argument("--images", type=int, default=8, help="nearest images shown per prototype")

    p = sub.add_parser("import-official", help=COMMANDS["import-official"])
    p.add_argument("pth", help="official HCSC checkpoint (.pth / .pth.tar)")
    p.add_argument("out", help="output file")

    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("--format", choices=("torchvision", "detectron2"), required=True)
    p.add_argument("checkpoint", help="any checkpoint hcsc-eval accepts")
    p.add_argument("out", help="output file (.pth for torchvision, .pkl for detectron2)")
    return parser


def _loader_args(args: argparse.Namespace) -> dict:
    from evaluate.checkpoints import stored_eval_sizes

    stored = stored_eval_sizes(args.checkpoint) or (224, 256)
    image_size = args.image_size or stored[0]
    resize = args.resize or max(stored[1], image_size)
    interpolation = args.interpolation or ("bilinear" if args.command == "linear" else "bicubic")
    return {"backend": args.backend, "image_size": image_size, "resize": resize,
            "interpolation": interpolation, "batch_size": args.batch_size, "workers": args.workers}


def _run(args: argparse.Namespace) -> dict:
    from evaluate import commands

    common = {"checkpoint": args.checkpoint, "encoder": args.encoder, "seed": args.seed, **_loader_args(args)}
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
    return _report(args, common)


def _report(args: argparse.Namespace, common: dict) -> dict:
    from evaluate.report import build_report_data, write_report

    data = build_report_data(shards=args.shards, split=args.split, num_clusters=args.num_clusters,
                             top_clusters=args.top_clusters, children=args.children, images=args.images,
                             niter=args.niter, nredo=args.nredo, **common)
    if data is None:
        return {}
    page = write_report(data, args.out)
    return {"command": "report", "page": str(page), "levels": [len(s) for s in data.sizes],
            "scores": data.scores}


def _offline(args: argparse.Namespace) -> dict:
    from evaluate import interop

    if args.command == "import-official":
        return {"command": "import-official", "out": args.out, **interop.import_official(args.pth, args.out)}
    export = interop.export_torchvision if args.format == "torchvision" else interop.export_detectron2
    keys = export(args.checkpoint, args.out)
    return {"command": "export", "format": args.format, "out": args.out, "keys": keys}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core import dist
    from core.logs import setup_logging
    from evaluate.checkpoints import CheckpointError
    from shards.format import ShardFormatError

    dist.init()
    setup_logging(None)
    main_rank = dist.is_main()
    try:
        result = _offline(args) if args.command in ("import-official", "export") else _run(args)
    except (CheckpointError, ShardFormatError, ValueError, FileNotFoundError) as err:
        logging.getLogger(__name__).debug("failure", exc_info=True)
        print(f"hcsc-eval {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    if main_rank and result and args.command in ("knn", "cluster") and args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    if main_rank and result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
