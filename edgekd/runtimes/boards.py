"""Flash and RAM of common microcontroller boards (``boards.json``, from their makers' datasheets).

Kept apart from the TFLM runtime so the report can say which boards a model fits without loading any runtime.
"""

from __future__ import annotations

import json
from importlib import resources


def boards() -> list[dict]:
    """Common microcontroller boards with their flash and RAM (``boards.json``, from datasheets)."""
    return list(json.loads(resources.files("edgekd.runtimes").joinpath("boards.json").read_text())["boards"])


def board_fit(flash_bytes: int, ram_bytes: int) -> list[dict]:
    """Every board of :func:`boards` with the share of its flash and RAM a model takes and whether it fits.

    Args:
        flash_bytes: The model array (the MCU file's size).
        ram_bytes: The tensor arena the firmware reserves.

    Returns:
        ``[{"name", "flash_kb", "ram_kb", "flash_share", "ram_share", "fits"}]``, smallest board first. The
        TFLM library and the application are not counted (they need flash and RAM of their own).
    """
    rows = []
    for b in boards():
        flash_share, ram_share = flash_bytes / (b["flash_kb"] * 1024), ram_bytes / (b["ram_kb"] * 1024)
        rows.append({"name": b["name"], "mcu": b["mcu"], "flash_kb": b["flash_kb"], "ram_kb": b["ram_kb"],
                     "flash_share": flash_share, "ram_share": ram_share,
                     "fits": flash_share <= 1 and ram_share <= 1})
    return rows
