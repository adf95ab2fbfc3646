"""What the MCU target of a finished run takes on a microcontroller, and whether TFLM computes what LiteRT does.

Takes a run directory with a static int8 TFLite student (the demo run: ``make demo`` writes
``exported/mnist/student_pruned_int8.tflite``), makes the MCU file from it again in a temporary copy (the real
``edgekd.export.mcu.export_mcu``: boundary off, names stripped, TFLM run on the test split, arena measured,
firmware written), and records: file sizes (int8 file vs MCU file), TFLM and LiteRT accuracy and their top-1
agreement, the arena (allocator total, smallest arena that loads, what the firmware reserves), which boards of
``edgekd/runtimes/boards.json`` it fits, Vela's Ethos-U55 estimate when ethos-u-vela is installed, and the
seconds the MCU export took.

Writes ``benchmarks/results/mcu_footprint.{json,md}`` and prints a summary.

Usage: python benchmarks/mcu_footprint.py [--run exported/mnist] [--io int8|uint8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgekd import provenance
from edgekd.export.mcu import export_mcu
from edgekd.runtimes.boards import board_fit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="exported/mnist", help="run directory with an int8 TFLite student")
    ap.add_argument("--io", default="int8", choices=["int8", "uint8"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    prov = provenance.start(threads=1)  # TFLM is single-threaded
    run = Path(args.run)
    meta = json.loads((run / "metadata.json").read_text())
    int8 = [e for e in meta["models"] if e["file"].endswith("_int8.tflite") and e["model"] != "teacher"
            and e.get("profile", "research") == "research"]  # the MCU file is made from the research int8 file
    if not int8:
        print(f"error: {run} has no int8 TFLite student file (export it with int8 in export.quantize)")
        return 2
    with np.load(run / "eval.npz") as ev:
        x, y = ev["x"], ev["y"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / run.name
        work.mkdir()
        shutil.copy2(run / int8[0]["file"], work / int8[0]["file"])
        t0 = time.perf_counter()
        entry, metrics = export_mcu(work, int8[0], args.io, x, y, run.name)
        seconds = time.perf_counter() - t0
    m = entry["mcu"]
    result = {
        "run": provenance.repo_path(run), "int8_file": int8[0]["file"], "int8_bytes": int8[0]["size_bytes"],
        "mcu_file": entry["file"],
        "io": args.io, "n_eval": int(len(y)), "mcu_export_seconds": round(seconds, 2),
        **{k: m[k] for k in ("flash_bytes", "arena_used_bytes", "arena_min_bytes", "arena_firmware_bytes",
                             "tflm_accuracy", "litert_accuracy", "tflm_litert_agreement", "ops", "runtime")},
        "boards_fit": [b["name"] for b in board_fit(m["flash_bytes"], m["ram_bytes"]) if b["fits"]],
        "boards_too_small": [b["name"] for b in board_fit(m["flash_bytes"], m["ram_bytes"]) if not b["fits"]],
        "ethos_u_estimate": m.get("ethos_u_estimate"),
        "provenance": prov.finish(),
    }
    lines = [f"{result['mcu_file']} (from `{run.name}/{result['int8_file']}`): {result['flash_bytes']} B flash "
             f"(int8 file {result['int8_bytes']} B), arena {result['arena_min_bytes']} B measured, "
             f"{result['arena_firmware_bytes']} B reserved; TFLM {result['tflm_accuracy']:.4f} = LiteRT "
             f"{result['litert_accuracy']:.4f} on {result['n_eval']} samples (agreement "
             f"{result['tflm_litert_agreement']:.4f}); MCU export {seconds:.1f} s.",
             "Fits: " + ", ".join(result["boards_fit"]) + "."]
    if result["ethos_u_estimate"]:
        e = result["ethos_u_estimate"]
        lines.append(f"Ethos-U55 (Vela estimate): {e.get('cycles')} cycles, {e.get('inference_ms')} ms, "
                     f"{e.get('sram_kb')} KB SRAM.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mcu_footprint.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "mcu_footprint.md").write_text("# MCU footprint\n\n" + "\n\n".join(lines) + "\n\n"
                                          + provenance.markdown(result["provenance"]))
    print("\n".join(lines))
    print(f"wrote {out / 'mcu_footprint.json'} and {out / 'mcu_footprint.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
