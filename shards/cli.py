"""`hcsc-shards`: pack image datasets into WebDataset shards (build | verify | info)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcsc-shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="pack a source into shards + DALI index files + _info.json")
    sub.add_parser("verify", help="check counts, checksums, idx coverage and index files")
    sub.add_parser("info", help="print a short summary of a shard folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"hcsc-shards {args.command}: not available in this version yet (issue 3)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
