"""`hcsc-train`: train HCSC from a YAML config plus `key=value` overrides.

Works as a single process, under `torchrun --nproc_per_node=N` and under the `deepspeed` launcher
(which also passes `--local_rank`, accepted and ignored: LOCAL_RANK from the environment wins).
"""

from __future__ import annotations

import argparse
import sys

from core.config import ConfigError, load_config, to_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcsc-train",
        description="Train HCSC (hierarchical contrastive selective coding) with DeepSpeed.",
        epilog="Examples:\n"
               "  hcsc-train --config configs/demo_fmnist.yaml\n"
               "  torchrun --nproc_per_node=8 -m train.cli --config configs/hcsc_r50_200ep.yaml "
               "data.shards=/data/in1k/train\n"
               "  deepspeed --hostfile hosts --module train.cli --config configs/hcsc_r50_200ep.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); schema: core/config.py")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotlist overrides, e.g. optim.lr=0.06 run.output_dir=runs/x")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key with its value) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"hcsc-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    # heavy imports (DeepSpeed, DALI) only when training
    from train.checkpoint import CheckpointWriteError
    from train.loop import run
    from train.rundir import RunDirError

    try:
        return run(cfg)
    except (RunDirError, CheckpointWriteError) as err:
        print(f"hcsc-train: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
