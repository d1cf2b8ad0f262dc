"""Command line: `resilience demo` (also `python -m resilience demo`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resilience", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo on embedded defaults (no servers needed)")
    parser.parse_args(argv)
    from resilience._demo import main as demo  # "demo" is the only command so far

    return demo()


if __name__ == "__main__":
    sys.exit(main())
