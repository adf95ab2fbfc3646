"""App clients on an exported run: MediaPipe, the TFLite Task Library and ONNX Runtime on the files as shipped.

For every app-profile ``.tflite`` file of the run:

* MediaPipe Tasks' ``ImageClassifier`` (the installed mediapipe) and LiteRT classify the test split from RGB
  uint8 images; their accuracies must be equal;
* the TFLite Task Library (tflite-support 0.4.4) reads the metadata back with its ``MetadataDisplayer`` and
  classifies the same images with its own ``ImageClassifier``. tflite-support pins protobuf 3.x, which
  conflicts with edgekd's environment, so it runs in a separate virtual environment created on first use
  under ``~/.cache/edgekd/tflite-support-0.4.4``;

and for the ONNX files: ``.ort`` accuracy against ``.onnx``, and dynamic-range files at batch 1 against
batch 256 (why validation measures them at batch 1).

Writes ``benchmarks/results/app_clients.{json,md}``.

Usage: python benchmarks/app_clients.py --run exported/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgekd import provenance
from edgekd.export.app_profile import to_pixels
from edgekd.export.app_tflite import litert_top1, mediapipe_top1
from edgekd.runtimes import runtime_for

RESULTS = Path(__file__).parent / "results"
TFS_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgekd" / "tflite-support-0.4.4"

# Runs inside the tflite-support venv: read the metadata back and classify the images with the Task Library.
_TFS_SCRIPT = r"""
import json, sys
import numpy as np
from tflite_support import metadata
from tflite_support.task import core, processor, vision

path, images = sys.argv[1], np.load(sys.argv[2])
shown = metadata.MetadataDisplayer.with_model_file(path)
md = json.loads(shown.get_metadata_json())
options = vision.ImageClassifierOptions(base_options=core.BaseOptions(file_name=path),
                                        classification_options=processor.ClassificationOptions(max_results=1))
clf = vision.ImageClassifier.create_from_options(options)
preds = []
for img in images:
    cats = clf.classify(vision.TensorImage.create_from_array(np.ascontiguousarray(img))).classifications[0].categories
    preds.append(cats[0].index if cats else -1)
print(json.dumps({"metadata": md, "packed_files": shown.get_packed_associated_file_list(), "preds": preds}))
"""


def _tfs_python() -> Path:
    """The tflite-support venv's python (created on first use).

    tflite-support's native extension links libusb-1.0, which minimal Linux images lack; the libusb-package
    wheel carries it, and a ``libusb-1.0.so.0`` link to it goes on LD_LIBRARY_PATH (see :func:`task_library`).
    """
    py = TFS_VENV / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(TFS_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "tflite-support==0.4.4", "numpy<2",
                        "libusb-package==1.0.30.0"], check=True)
    link = TFS_VENV / "libusb" / "libusb-1.0.so.0"
    if not link.exists():
        lib = next(TFS_VENV.glob("lib/python*/site-packages/libusb_package/libusb-1.0.so"))
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(lib)
    return py


def task_library(path: Path, pixels: np.ndarray) -> dict:
    """Metadata and top-1 predictions of one file in the TFLite Task Library (separate venv)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", pixels)
        py = _tfs_python()
        env = {**os.environ, "LD_LIBRARY_PATH": str(TFS_VENV / "libusb")}
        proc = subprocess.run([str(py), "-c", _TFS_SCRIPT, str(path), str(Path(tmp) / "x.npy")],
                              capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--no-task-library", action="store_true", help="skip the tflite-support checks")
    args = ap.parse_args()
    prov = provenance.start(threads="runtime defaults")
    run = args.run
    meta = {e["file"]: e for e in json.loads((run / "metadata.json").read_text())["models"]}
    ev = np.load(run / "eval.npz")
    x, y = ev["x"], ev["y"]
    pixels = to_pixels(x)
    rows, onnx_rows = [], []
    for name, e in meta.items():
        if e.get("profile") != "app":
            continue
        row = {"file": name, "precision": e["precision"], "input_dtype": e["input"]["dtype"],
               "litert": float((litert_top1(run / name, pixels) == y).mean()),
               "mediapipe": float((mediapipe_top1(run / name, pixels) == y).mean())}
        if not args.no_task_library:
            tl = task_library(run / name, pixels)
            if "error" in tl:
                row["task_library"] = tl["error"]
            else:
                row["task_library"] = float((np.asarray(tl["preds"]) == y).mean())
                sg = tl["metadata"]["subgraph_metadata"][0]
                row["metadata_read_back"] = {
                    "min_parser_version": tl["metadata"].get("min_parser_version"),
                    "normalization": sg["input_tensor_metadata"][0]["process_units"][0]["options"],
                    "labels_file": sg["output_tensor_metadata"][0]["associated_files"][0],
                    "packed_files": tl["packed_files"]}
        rows.append(row)
        print(json.dumps(row))
    for name, e in meta.items():
        if e["format"] == "ort" or (e["format"] == "onnx" and e["precision"] == "dynamic"):
            rt = runtime_for(run / name, e)
            r = {"file": name, "batch1": float((rt.predict(x, batch_size=1).argmax(1) == y).mean()),
                 "batch256": float((rt.predict(x, batch_size=256).argmax(1) == y).mean())}
            if e.get("source"):
                src = runtime_for(run / e["source"], meta[e["source"]])
                r["source_batch1"] = float((src.predict(x, batch_size=1).argmax(1) == y).mean())
            onnx_rows.append(r)
            print(json.dumps(r))
    RESULTS.mkdir(exist_ok=True)
    block = prov.finish()
    (RESULTS / "app_clients.json").write_text(json.dumps({"run": run.name, "samples": int(len(y)), "tflite": rows,
                                                          "onnx": onnx_rows, "provenance": block}, indent=2))
    lines = ["| file | input | LiteRT | MediaPipe | Task Library |", "|---|---|---|---|---|"]
    for r in rows:
        tl = r.get("task_library", "-")
        lines.append(f"| {r['file']} | {r['input_dtype']} | {r['litert']:.4f} | {r['mediapipe']:.4f} | "
                     f"{tl if isinstance(tl, str) else f'{tl:.4f}'} |")
    lines += ["", "| file | batch 1 | batch 256 | source .onnx, batch 1 |", "|---|---|---|---|"]
    for r in onnx_rows:
        src = f"{r['source_batch1']:.4f}" if "source_batch1" in r else "-"
        lines.append(f"| {r['file']} | {r['batch1']:.4f} | {r['batch256']:.4f} | {src} |")
    lines += ["", provenance.markdown(block)]
    (RESULTS / "app_clients.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
