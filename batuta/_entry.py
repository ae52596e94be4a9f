"""The `batuta` command's entry point (the console script and `python -m batuta`).

Ctrl-C while the command's modules import (its first tenth of a second) ended it with
Python's bare KeyboardInterrupt traceback; it ends as Ctrl-C anywhere later does: "batuta:
interrupted", exit 130. This module imports nothing else, so that the window left is
Python's own start-up.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # cli/_common.py's, not imported: importing is what may be interrupted


def main() -> int:
    try:
        from batuta.cli import main as batuta
    except KeyboardInterrupt:
        print("batuta: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return batuta()
