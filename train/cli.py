"""`hcsc-train`: train HCSC from a YAML config plus `key=value` overrides.

Works as a single process, under `torchrun --nproc_per_node=N` and under the `deepspeed` launcher
(which also passes `--local_rank`, accepted and ignored: LOCAL_RANK from the environment wins).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core.cli import run_cli
from core.config import Config, ConfigError, load_config, to_yaml
from core.install import check_faiss_build
from core.runfolder import RunFolder
from train.checkpoint import CheckpointWriteError


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
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a failure on the console too (or set HCSC_DEBUG=1); "
                        "it always goes to the run's logs/rank<r>.log")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg: Config | None = None

    def body() -> int:
        nonlocal cfg
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        check_faiss_build()  # before the imports that load faiss
        from train.loop import run  # heavy imports (DeepSpeed, DALI) only when training

        return run(cfg)

    def log_file() -> Path | None:
        """The run's own log, once the run folder has one."""
        if cfg is None:
            return None
        path = RunFolder.at(cfg.run.output_dir).rank_log(int(os.environ.get("RANK", "0")))
        return path if path.parent.is_dir() else None

    return run_cli("hcsc-train", body, user_errors=(ConfigError, CheckpointWriteError), log_file=log_file,
                   debug=args.debug, interrupted="a checkpoint is written only at a logging step after "
                   "SIGTERM/SIGINT is received; resume with run.resume=auto")


if __name__ == "__main__":
    sys.exit(main())
