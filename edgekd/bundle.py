"""Gather what a device needs to measure a run into one folder: ``make_bundle(run_dir)``.

A bundle holds the model files listed in ``metadata.json`` (with an ONNX model's external-data files),
``metadata.json``, ``labels.txt``, ``eval.npz``, a copy of ``device_tests/bench.py`` and a README with
the commands to run on the device. Copy the folder to a Raspberry Pi (or push it with adb) and run
``python3 bench.py . --json pi.json`` inside it.

The bundle is assembled in a temporary folder beside its destination and renamed into place, so an
interrupted call never leaves a half-written bundle that looks complete.

Run as a script: ``python -m edgekd.bundle RUN_DIR [OUT_DIR]`` prints the bundle's path.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from edgekd.errors import ArtifactChanged, RunDirError
from edgekd.run_dir import sha256_file


class BundleError(RunDirError, ValueError):
    """A run directory cannot be bundled (missing or damaged files). The message is one line."""


class BundleFileChanged(BundleError, ArtifactChanged):
    """A model file differs from the sha256 in metadata.json (changed or truncated since export). Exit code 1."""

    exit_code = 1


BENCH_SOURCE = Path(__file__).resolve().parents[1] / "device_tests" / "bench.py"


def bench_script() -> Path:
    """device_tests/bench.py: from the source checkout, else from the installed wheel (edgekd.device_tests)."""
    if BENCH_SOURCE.is_file():
        return BENCH_SOURCE
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("edgekd.device_tests") / "bench.py"))
    except ModuleNotFoundError:
        return BENCH_SOURCE
DEFAULT_DIRNAME = "bundle"

README = """\
# Device bundle for run `{run}`

Everything a device needs to measure this run: {n_models} model file(s), `metadata.json`, `labels.txt`,
`eval.npz` ({n_eval} samples) and `bench.py`. Copy this folder to the device, open a shell inside it, and:

## Raspberry Pi (64-bit Raspberry Pi OS, Python 3.9 to 3.11)

    pip install "numpy<2" tflite-runtime==2.14.0
    python3 bench.py . --json pi.json

On Raspberry Pi OS bookworm pip refuses system-wide installs; use a virtual environment instead:

    python3 -m venv ~/edgekd-venv
    ~/edgekd-venv/bin/pip install "numpy<2" tflite-runtime==2.14.0
    ~/edgekd-venv/bin/python bench.py . --json pi.json

tflite-runtime has no wheel for Python 3.12 or later: there, install `ai-edge-litert` instead (bench.py
picks up ai_edge_litert, tflite_runtime or tensorflow, in that order). For the ONNX models install
`onnxruntime` and pass `--runtime onnx` (or `--runtime auto` for both).

Options: `--threads N` (default: cores, at most 4), `--runs N` (timed runs, default 100),
`--warmup N` (default 10). `pi.json` holds the device, the accuracy of each model on `eval.npz` and its
batch-1 latency (p50/p90/p99/mean ms); models the runtime cannot run are listed under `skipped`.

## In an app

`*_app_*.tflite` files load unchanged in MediaPipe's `ImageClassifier` (Android, iOS, Python) and the TFLite
Task Library: RGB pixels in, labels and normalization in the file's metadata. `.onnx` files carry their labels
and normalization in `metadata_props`; `.ort` files (if exported with `--ort`) are for ONNX Runtime Mobile.
See docs/app.md in the edgekd repository for the code.

## Android

Use `device_tests/android/run_android.sh` from the edgekd repository with this folder: it pushes the
.tflite files with adb and times them with TensorFlow Lite's `benchmark_model` binary.

## ExecuTorch (.pte files)

`*.pte` files are ExecuTorch programs lowered to the XNNPACK delegate (CPU, float32 input in the layout and
normalization `metadata.json` gives, float32 logits out; int8 files quantize inside the delegate). On Android,
add `org.pytorch:executorch-android` and run `Module.load(path).forward(EValue.from(tensor))`; on iOS, add the
`executorch` and `backend_xnnpack` Swift packages and run the `forward` method of an `ExecuTorchModule`.
On a Linux board with Python: `pip install executorch`, then
`executorch.runtime.Runtime.get().load_program("student_fp32.pte").load_method("forward").execute((x,))`.
"""


def _onnx_external_files(model_path: Path) -> list[str]:
    """Relative paths of the external-data files an ONNX model refers to (torch's dynamo exporter writes
    the weights to ``<name>.onnx.data``; without them the model cannot load on the device)."""
    try:
        import onnx
    except ImportError:  # without onnx, fall back to the name torch.onnx gives the data file
        sibling = model_path.with_name(model_path.name + ".data")
        return [sibling.name] if sibling.is_file() else []
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise BundleError(f"{model_path} is not a readable ONNX model ({e.__class__.__name__})") from e
    locations = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes can hold external tensors too
        tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    for tensor in tensors:
        for kv in tensor.external_data:
            if kv.key == "location" and kv.value not in locations:
                locations.append(kv.value)
    return locations


def _companions(entry: dict) -> list:
    """Run-relative files a model file needs beside it, as its backend recorded them: ``companions``, and in
    runs written before that key the MCU file's ``mcu.firmware`` and the .ort files' ``ort_config``."""
    if isinstance(entry.get("companions"), list):
        return list(entry["companions"])
    out = list(entry["mcu"].get("firmware", [])) if isinstance(entry.get("mcu"), dict) else []
    return out + ([entry["ort_config"]] if isinstance(entry.get("ort_config"), str) else [])


def _files_to_copy(run_dir: Path, meta: dict) -> list[str]:
    """Every file the bundle needs, relative to the run directory, checked against the metadata."""
    models = meta.get("models")
    if not isinstance(models, list) or not models:
        raise BundleError(f"{run_dir / 'metadata.json'} lists no models",
                          "run 'edgekd export' again for this run")
    files, missing = [], []
    for entry in models:
        rel = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"metadata.json has a model entry with an invalid 'file': {rel!r}")
        path = run_dir / rel
        if not path.is_file():
            missing.append(rel)
            continue
        sha = entry.get("sha256")
        if sha and sha256_file(path) != sha:
            raise BundleFileChanged(f"{path} differs from the sha256 in metadata.json: it was changed or damaged",
                                    "export the run again", files=[rel])
        files.append(rel)
        for extra in _companions(entry):  # files that travel with the model (firmware sources, operator lists)
            if not isinstance(extra, str) or not extra or Path(extra).is_absolute() or ".." in Path(extra).parts:
                raise BundleError(f"metadata.json has an invalid companion file for {rel}: {extra!r}")
            (files if (run_dir / extra).is_file() else missing).append(extra)
        if path.suffix.lower() == ".onnx":
            for data_rel in _onnx_external_files(path):
                data_path = path.parent / data_rel
                if not data_path.is_file():
                    missing.append(str(Path(rel).parent / data_rel))
                else:
                    files.append(str(Path(rel).parent / data_rel))
    if missing:
        raise BundleError(f"model file(s) listed in metadata.json are missing from {run_dir}: "
                          + ", ".join(missing), "export the run again")
    return list(dict.fromkeys(files))


def make_bundle(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write a self-contained device bundle for a run directory.

    Args:
        run_dir: A run directory written by ``edgekd export`` (holding metadata.json and eval.npz).
        out_dir: Where to write the bundle; default ``<run_dir>/bundle``. An existing bundle there is
            replaced.

    Returns:
        The bundle folder.

    Raises:
        BundleError: metadata.json, eval.npz or a listed model file is missing or damaged, or bench.py
            cannot be found next to the package.
    """
    run_dir = Path(run_dir).resolve()
    meta_path = run_dir / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} not found: {run_dir} is not an exported run directory",
                          "run 'edgekd export' first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path} is not valid JSON ({e.__class__.__name__})") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} does not hold a JSON object")
    if not (run_dir / "eval.npz").is_file():
        raise BundleError(f"{run_dir / 'eval.npz'} not found: the device needs it to measure accuracy",
                          "run 'edgekd export' again")
    bench = bench_script()
    if not bench.is_file():
        raise BundleError(f"{bench} not found: this edgekd install lacks its device script",
                          "reinstall edgekd (pip install --force-reinstall edgekd)")
    model_files = _files_to_copy(run_dir, meta)

    out_dir = Path(out_dir).resolve() if out_dir is not None else run_dir / DEFAULT_DIRNAME
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for rel in model_files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / rel, tmp / rel)
        shutil.copy2(meta_path, tmp / "metadata.json")
        shutil.copy2(run_dir / "eval.npz", tmp / "eval.npz")
        labels_txt = run_dir / "labels.txt"
        if labels_txt.is_file():
            shutil.copy2(labels_txt, tmp / "labels.txt")
        else:  # older runs: the labels are also in metadata.json
            (tmp / "labels.txt").write_text("".join(f"{lab}\n" for lab in meta.get("labels", [])),
                                            encoding="utf-8")
        shutil.copy2(bench, tmp / "bench.py")
        (tmp / "bench.py").chmod(0o755)
        (tmp / "README.md").write_text(README.format(run=meta.get("run", run_dir.name),
                                                     n_models=len(meta.get("models", [])),
                                                     n_eval=_count_eval(run_dir / "eval.npz")),
                                       encoding="utf-8")
        tmp.chmod(0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _count_eval(path: Path) -> str:
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            return str(len(data["y"]))
    except Exception:
        return "?"


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` onto ``dest``. An existing ``dest`` is first renamed aside, so at every moment
    ``dest`` is either the old complete bundle, absent, or the new complete bundle."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m edgekd.bundle RUN_DIR [OUT_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0] in ("-h", "--help"):
        print("usage: python -m edgekd.bundle RUN_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        out = make_bundle(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    except BundleError as e:
        print(f"edgekd bundle: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
