"""What the benchmarks need of their peers, checked before anything is measured."""

from __future__ import annotations

import argparse
import importlib.util


def check_dask(parser: argparse.ArgumentParser, skip: bool) -> None:
    """Stop at once where Dask, the peer measured after batuta, is missing: the run would
    otherwise measure batuta for minutes and then fail without printing its numbers."""
    if not skip and importlib.util.find_spec("distributed") is None:
        parser.error(
            "Dask, the peer this compares with, is not installed: pip install -e '.[bench]', or pass --skip-dask"
        )
