"""An Arm Ethos-U55 estimate for an MCU file, from Arm's Vela compiler (optional: ``pip install ethos-u-vela``).

Vela compiles a full-integer ``.tflite`` file for the Ethos-U NPU and reports its performance model: NPU cycles,
SRAM and flash use, which operators fall back to the CPU. These are Vela's *estimates* for its default
system configuration (``Ethos_U55_High_End_Embedded``, 500 MHz, shared SRAM), not measurements on a board.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_ACCELERATOR = "ethos-u55-128"
_TIMEOUT_S = 300


def vela_available() -> bool:
    """Whether the ``ethos-u-vela`` package is installed."""
    try:
        import ethosu.vela  # noqa: F401
    except ImportError:
        return False
    return True


def vela_estimate(mcu_path: Path, accelerator: str = DEFAULT_ACCELERATOR) -> dict[str, Any] | None:
    """Vela's estimate for ``mcu_path`` on an Ethos-U accelerator; None when Vela is not installed.

    Returns:
        ``{"estimate": True, "tool", "accelerator", "system_config", "clock_hz", "cycles", "inference_ms",
        "sram_kb", "flash_kb", "npu_ops", "cpu_ops"}``, or ``{"estimate": True, "error": ...}`` when Vela cannot
        compile the file (the MCU export itself does not depend on it).
    """
    if not vela_available():
        return None
    from importlib.metadata import version

    tool = f"ethos-u-vela {version('ethos-u-vela')}"
    with tempfile.TemporaryDirectory(prefix="edgekd-vela-") as out:
        cmd = [sys.executable, "-m", "ethosu.vela", str(mcu_path), "--accelerator-config", accelerator,
               "--output-dir", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"estimate": True, "tool": tool, "accelerator": accelerator, "error": "Vela timed out"}
        summaries = sorted(Path(out).glob("*_summary_*.csv"))
        if proc.returncode != 0 or not summaries:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            return {"estimate": True, "tool": tool, "accelerator": accelerator,
                    "error": (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
        with open(summaries[0], newline="") as f:
            row = next(csv.DictReader(f))
    npu, cpu = _op_counts(proc.stdout)
    return {"estimate": True, "tool": tool, "accelerator": row["accelerator_configuration"],
            "system_config": row["system_config"], "clock_hz": float(row["core_clock"]),
            "cycles": int(float(row["cycles_total"])), "inference_ms": 1000 * float(row["inference_time"]),
            "sram_kb": float(row["sram_memory_used"]),
            "flash_kb": float(row["off_chip_flash_memory_used"]) + float(row["on_chip_flash_memory_used"]),
            "npu_ops": npu, "cpu_ops": cpu}


def _op_counts(stdout: str) -> tuple[int | None, int | None]:
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        for kind in ("CPU", "NPU"):
            if line.strip().startswith(f"{kind} operators ="):
                counts[kind] = int(line.split("=")[1].split()[0])
    return counts.get("NPU"), counts.get("CPU")
