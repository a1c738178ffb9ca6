"""The benchmarks' command line: sizes with units, lists, per-platform defaults, devices, metadata.

Every benchmark's ``argparse`` parser is built from these pieces, so the options read the same
everywhere (``--platform``, ``--cpu-devices``, ``--iters``, ``--repeats``, ``--json``) and
``--help`` shows every default (:class:`HelpFormatter`). :mod:`spmd.bench.harness` re-exports
them under their old names.
"""

from __future__ import annotations

import argparse
import datetime
import platform as _platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "BenchError",
    "HelpFormatter",
    "add_device_args",
    "add_timing_args",
    "fill_defaults",
    "format_size",
    "metadata",
    "parse_and_start",
    "parse_list",
    "parse_size",
    "positive_int",
    "start_devices",
]

# Binary units, as nccl-tests reads -b/-e (K = 1024): B, K/KB/KiB, M/MB/MiB, G/GB/GiB, case-insensitive.
_UNITS = {
    "": 1,
    "B": 1,
    **{f"{p}{suffix}": 1 << (10 * (i + 1)) for i, p in enumerate("KMG") for suffix in ("", "B", "IB")},
}


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (no such devices, a bad combination of flags)."""


# --------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default (except ``None``: such options say their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def parse_size(text: str) -> int:
    """``"2KiB"`` -> 2048. Accepts B, K/KiB, M/MiB, G/GiB (binary, as nccl-tests' ``-b 8 -e 1G``; case-insensitive).

    Raises:
      argparse.ArgumentTypeError: not a positive whole number of bytes.
    """
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and t.endswith(unit):
            number, scale = t[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = t, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 2KiB or 1MiB, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of bytes, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """2048 -> ``"2 KiB"``; sizes that are not whole KiB / MiB / GiB stay in bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive int.

    Raises:
      argparse.ArgumentTypeError: anything else.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def parse_list(text: str, item: Callable[[str], Any], *, what: str) -> list:
    """``"2,4"`` -> ``[item("2"), item("4")]``.

    Raises:
      argparse.ArgumentTypeError: an empty list or an item ``item`` refuses (the message names ``what``).
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
    try:
        return [item(p) for p in parts]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(f"{what}: {e}") from None


def fill_defaults(p: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Set the options left at ``None`` from ``defaults`` (per-platform values), parsed as if given."""
    for action in p._actions:
        if action.dest in defaults and getattr(args, action.dest, None) is None:
            value = defaults[action.dest]
            if action.type is not None and isinstance(value, str | int | float):
                value = action.type(str(value))
            setattr(args, action.dest, value)


def add_device_args(p: argparse.ArgumentParser, *, cpu_devices: int = 8) -> None:
    """``--platform`` and ``--cpu-devices``."""
    p.add_argument(
        "--platform",
        choices=("auto", "cpu", "gpu", "tpu"),
        default="auto",
        help="devices to run on: auto = the accelerators JAX finds, else simulated CPU devices",
    )
    p.add_argument(
        "--cpu-devices", type=positive_int, default=cpu_devices, help="how many CPU devices to simulate on CPU"
    )


def add_timing_args(p: argparse.ArgumentParser, *, json_path: str, iters: int | None, repeats: int | None) -> None:
    """``--iters``, ``--repeats`` and ``--json`` (``None`` defaults are resolved per platform by the caller)."""
    p.add_argument(
        "--iters",
        type=positive_int,
        default=iters,
        help="chained calls per timed loop" + ("" if iters is not None else " (default: per platform, see below)"),
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=repeats,
        help="timed loops; the best is reported" + ("" if repeats is not None else " (default: per platform)"),
    )
    p.add_argument("--json", default=json_path, help="where to write the results (not written if nothing ran)")


def parse_and_start(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list]:
    """Parse a benchmark's command line (``--platform``, ``--cpu-devices``) and start JAX on those devices.

    Exits with status 2 and ``"<prog>: <why>"`` on stderr when JAX has no such devices here.
    """
    args = parser.parse_args(argv)
    try:
        return args, start_devices(args.platform, args.cpu_devices)
    except BenchError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")


def start_devices(platform: str, cpu_devices: int) -> list:
    """Start JAX on the asked-for devices.

    Args:
      platform: ``"auto"`` (accelerators if any, else CPU), ``"cpu"``, ``"gpu"`` or ``"tpu"``.
      cpu_devices: how many CPU devices to simulate (used only when running on CPU).

    Returns:
      The devices, ``jax.devices(platform)``.

    Raises:
      BenchError: JAX has no devices of that platform here.
    """
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", cpu_devices)  # only the CPU backend reads it
    except RuntimeError:  # the backend is already up (in-process callers): keep its devices
        pass
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
    try:
        devices = jax.devices() if platform in ("auto", "cpu") else jax.devices(platform)
    except RuntimeError as e:
        raise BenchError(
            f"--platform {platform}: JAX found no {platform} devices on this machine ({e}). "
            f"Run on a {platform.upper()} machine, or use --platform cpu for simulated devices."
        ) from None
    return list(devices)


def metadata(prog: str, argv: Sequence[str] | None, devices: Sequence[Any], **extra: Any) -> dict[str, Any]:
    """What a result file records besides its rows: device, date, command, versions, host."""
    import jax

    return {
        "command": " ".join([prog, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "jax": jax.__version__,
        "python": _platform.python_version(),
        "host": _platform.node(),
        **extra,
    }
