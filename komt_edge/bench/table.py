"""How the benchmark reports write files and numbers in their Markdown tables and plots: the short type name,
sizes in MiB, and a dash for a value that was not measured."""

from __future__ import annotations

import math

from ..converters.gguf_file import FileInfo

MIB = 1024 * 1024


def type_label(info: FileInfo) -> str:
    """The short type name: MOSTLY_Q4_K_M → Q4_K_M, ALL_F32 → F32."""
    ft = info.file_type
    for prefix in ("MOSTLY_", "ALL_"):
        if ft.startswith(prefix):
            return ft[len(prefix):]
    return ft


def cell(x: float | None, spec: str = ".4g", empty: str = "–") -> str:
    """``x`` formatted with ``spec``; ``empty`` for None or NaN (not measured)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return empty
    return format(x, spec)
