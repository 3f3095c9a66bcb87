"""The `fleet` console (grows with the fleet issue)."""

from __future__ import annotations

import argparse
import sys

from agent import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description="Fleet management for edge-agent devices.")
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
