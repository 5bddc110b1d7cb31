"""`hcsc-eval`: evaluate HCSC checkpoints (kNN, linear probe, clustering, import/export, report)."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "knn": "weighted kNN top-1/top-5 on trunk features",
    "linear": "linear probe on the frozen trunk",
    "cluster": "hierarchical k-means of val features: NMI, AMI, ARI, Hungarian accuracy",
    "import-official": "convert an official HCSC .pth into our checkpoint layout",
    "export": "export a backbone as torchvision or detectron2 weights",
    "report": "HTML report of the learned cluster hierarchy",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcsc-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"hcsc-eval {args.command}: not available in this version yet (issue 8)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
