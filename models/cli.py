"""argparse types shared by the ``python -m models.*`` commands (one definition of each)."""

from __future__ import annotations

import argparse

from spmd.bench.cli_args import positive_int  # one definition for every command, benches included

__all__ = ["PLATFORMS", "positive_int", "seconds", "token_ids"]

PLATFORMS = ("auto", "cpu", "gpu")


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def token_ids(text: str) -> list[int]:
    """argparse type: comma-separated token ids, at least one."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"expected at least one token id, got {text!r}")
    return ids
