"""``covidct``: the command line over the library (the DVC stages live in ``pipelines/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covidct.config import ConfigError, load_params, validate_all
from covidct.profiles import apply_profile, available


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="covidct", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    profile = sub.add_parser("profile", help="merge a profile from pipelines/profiles/ into params.yaml")
    profile.add_argument("name", nargs="?", help="profile name; omit to list them")
    sub.add_parser("check-params", help="validate every section of params.yaml")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if args.command == "profile":
            if not args.name:
                print("\n".join(available(root)))
                return
            apply_profile(root, args.name)
            print(f"params.yaml now uses profile {args.name!r}; run `dvc repro` (or `dvc status` to see what changes)")
        elif args.command == "check-params":
            validate_all(load_params(root / "params.yaml"))
            print("params.yaml is valid")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
