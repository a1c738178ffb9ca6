"""The GEMV tuning table: per device kind, dtype, layout, shape and row range, the tiling to run (or XLA).

The table is data (``gemv_tuning.json`` beside this file), written from measurements
(``python -m models.bench_gemv --write-table``): each entry records the kernel's time and XLA's for
the same product, measured in the same run, and names the winner. A shape the table does not list
runs on XLA: the kernel is only used where it was measured faster.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

from kernels.gemv.ops import LAYOUTS, PROLOGUES, GemvConfig, ineligibility

__all__ = ["TABLE_PATH", "TableEntry", "load_table", "lookup"]

TABLE_PATH = pathlib.Path(__file__).with_name("gemv_tuning.json")


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One measured shape.

    Attributes:
      device_kind: ``jax.Device.device_kind`` it was measured on (e.g. ``"NVIDIA H200"``).
      dtype: the operands' dtype name.
      layout: ``"kn"`` or ``"nk"`` (see :mod:`kernels.gemv.ops`).
      k, n: the product's inner and output sizes.
      rows: ``(lo, hi)``: the entry holds for ``lo <= M <= hi``.
      config: the tiling to run, or ``None`` where XLA was faster.
      us, xla_us: the measured times (microseconds) of the kernel and of XLA's product.
      prologue: ``"none"``, or ``"swiglu"``: the kernel with the activation built in (``us``) against
        XLA's activation fusion followed by the plain product (``xla_us``); ``config`` ``None``: apart won.
    """

    device_kind: str
    dtype: str
    layout: str
    k: int
    n: int
    rows: tuple[int, int]
    config: GemvConfig | None
    us: float
    xla_us: float
    prologue: str = "none"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableEntry:
        config = d.get("config")
        entry = cls(
            device_kind=str(d["device_kind"]),
            dtype=str(d["dtype"]),
            layout=str(d["layout"]),
            k=int(d["k"]),
            n=int(d["n"]),
            rows=(int(d["rows"][0]), int(d["rows"][1])),
            config=None if config is None else GemvConfig.from_dict(config),
            us=float(d["us"]),
            xla_us=float(d["xla_us"]),
            prologue=str(d.get("prologue", "none")),
        )
        if entry.prologue not in PROLOGUES:
            raise ValueError(f"prologue {entry.prologue!r} is not one of {PROLOGUES}")
        if entry.layout not in LAYOUTS or not 1 <= entry.rows[0] <= entry.rows[1] <= 64:
            raise ValueError(f"layout {entry.layout!r} or rows {entry.rows} out of range")
        if entry.config is not None:
            reason = ineligibility(entry.rows[1], entry.k, entry.n, entry.config, entry.layout)
            if reason:
                raise ValueError(reason)
        return entry

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rows"] = list(self.rows)
        return d


@functools.lru_cache(maxsize=8)
def load_table(path: str | pathlib.Path = TABLE_PATH) -> tuple[TableEntry, ...]:
    """The entries of a tuning file (cached per path).

    Raises:
      ValueError: the file is not a JSON list of valid entries (naming the entry).
    """
    raw = json.loads(pathlib.Path(path).read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise ValueError(f"{path}: expected a JSON object with a list 'entries'.")
    entries = []
    for i, d in enumerate(raw["entries"]):
        try:
            entries.append(TableEntry.from_dict(d))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: entry {i} is not a valid GEMV table entry: {e}") from e
    return tuple(entries)


def lookup(
    entries: tuple[TableEntry, ...],
    device_kind: str,
    dtype: str,
    layout: str,
    m: int,
    k: int,
    n: int,
    prologue: str = "none",
) -> GemvConfig | None:
    """The tiling the table picks for this product (with this prologue), or ``None`` (run XLA's / apart)."""
    for e in entries:
        if (e.device_kind, e.dtype, e.layout, e.k, e.n, e.prologue) == (device_kind, dtype, layout, k, n, prologue):
            if e.rows[0] <= m <= e.rows[1]:
                return e.config
    return None
