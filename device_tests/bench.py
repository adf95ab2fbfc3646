#!/usr/bin/env python3
"""Measure the models of an edgekd run directory (or a device bundle) on the machine this runs on.

This file is copied onto devices on its own, so it depends on nothing but the standard library, numpy and
one inference runtime: ``ai_edge_litert``, ``tflite_runtime`` or ``tensorflow`` for ``.tflite`` files,
``onnxruntime`` for ``.onnx`` files. It runs on Python 3.9 and later (Raspberry Pi OS bullseye ships 3.9).

For every model listed in ``metadata.json`` it reports the accuracy on ``eval.npz`` and the latency of
one batch-1 inference (warm-up first, then p50/p90/p99/mean in milliseconds). Models this runtime cannot
run (another format, a file whose size or sha256 differs from the metadata, a file the runtime cannot
load) are listed under ``skipped`` with the reason, and the others are still measured.

Usage::

    python3 bench.py RUN_DIR [--runtime tflite|onnx|auto] [--threads N] [--runs N] [--warmup N]
                             [--json OUT] [--emulated]

Exit codes: 0 when at least one model was measured, 1 when every model was skipped, 2 for bad input
(no metadata.json, no eval.npz, no runtime installed, bad arguments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SCHEMA_VERSION = 1
EXIT_OK, EXIT_ALL_SKIPPED, EXIT_BAD_INPUT = 0, 1, 2
# Chunk size for models whose batch dimension is dynamic: large enough to amortize per-call overhead,
# small enough to stay well inside a Pi Zero's memory for image inputs.
EVAL_CHUNK = 256


class BadInput(Exception):
    """Something the user must fix; reported as one line on stderr with exit code 2."""


class Skip(Exception):
    """A model this runtime cannot measure; the message is the reason shown under ``skipped``."""


# Precisions whose arithmetic is integer (or int8 weights with runtime-quantized activations, or int8 layers
# beside float ones: mixed).
INTEGER_PRECISIONS = ("int8", "dynamic", "mixed")


# --------------------------------------------------------------------------------------------- runtimes


def builtin_resolver(interpreter_cls):
    """The ``OpResolverType`` that selects TFLite's built-in kernels without default delegates, or None."""
    mod = sys.modules.get(getattr(interpreter_cls, "__module__", ""), None)
    kinds = getattr(mod, "OpResolverType", None)
    return getattr(kinds, "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)


def _load_tflite():
    """Return ``(module name, version, Interpreter class)`` of the first TFLite interpreter installed."""
    try:
        from ai_edge_litert import interpreter as mod  # LiteRT, the successor of tflite_runtime

        import ai_edge_litert

        return "ai_edge_litert", _version_of(ai_edge_litert, "ai-edge-litert"), mod.Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod

        import tflite_runtime

        return "tflite_runtime", _version_of(tflite_runtime, "tflite-runtime"), mod.Interpreter
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return "tensorflow", tf.__version__, tf.lite.Interpreter
    except ImportError:
        return None


def _load_onnx():
    """Return ``(module name, version, module)`` for onnxruntime, or None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return "onnxruntime", ort.__version__, ort


def _version_of(module, dist_name: str) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:  # ai_edge_litert has no __version__; the installed distribution knows it
        from importlib.metadata import version as dist_version

        return dist_version(dist_name)
    except Exception:
        return "unknown"


INSTALL_HINT = {
    "tflite": 'pip install "numpy<2" tflite-runtime==2.14.0   (or: pip install ai-edge-litert)',
    "onnx": "pip install onnxruntime",
}


def resolve_runtimes(requested: str) -> dict:
    """Map each model format to the runtime that will run it.

    Args:
        requested: ``tflite``, ``onnx`` or ``auto`` (every runtime that is installed).

    Returns:
        ``{"tflite": (name, version, handle), "onnx": (...)}`` with only the formats that can run.

    Raises:
        BadInput: The requested runtime (or, for ``auto``, every runtime) is not installed.
    """
    loaders = {"tflite": _load_tflite, "onnx": _load_onnx}
    wanted = ["tflite", "onnx"] if requested == "auto" else [requested]
    found = {}
    for fmt in wanted:
        rt = loaders[fmt]()
        if rt is not None:
            found[fmt] = rt
    if not found:
        if requested == "auto":
            raise BadInput("no inference runtime is installed: " + INSTALL_HINT["tflite"] + "; or: "
                           + INSTALL_HINT["onnx"])
        raise BadInput(f"runtime '{requested}' is not installed: {INSTALL_HINT[requested]}")
    return found


# ----------------------------------------------------------------------------------------- run directory


def load_metadata(run_dir: Path) -> dict:
    """Read and minimally validate ``metadata.json``.

    Raises:
        BadInput: The file is missing, not JSON, or has no ``models`` list.
    """
    path = run_dir / "metadata.json"
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir} is not a directory")
    if not path.is_file():
        raise BadInput(f"{path} not found: pass a run directory written by 'edgekd export' or a bundle")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("models"), list):
        raise BadInput(f"{path} has no 'models' list")
    return meta


def load_eval(run_dir: Path, np, max_eval: int | None):
    """Read ``eval.npz`` and return ``(x float32, y int64)``.

    Raises:
        BadInput: The file is missing, unreadable, or ``x``/``y`` are absent or disagree in length.
    """
    path = run_dir / "eval.npz"
    if not path.is_file():
        raise BadInput(f"{path} not found: the run directory or bundle is incomplete")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files or "y" not in data.files:
                raise BadInput(f"{path} must hold arrays 'x' and 'y', found {sorted(data.files)}")
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"]).astype(np.int64).reshape(-1)
    except BadInput:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError: all mean a damaged file
        raise BadInput(f"{path} cannot be read ({type(e).__name__}: {_one_line(e)})") from None
    if len(x) != len(y) or len(y) == 0:
        raise BadInput(f"{path}: x has {len(x)} rows and y has {len(y)}; they must match and be non-empty")
    if max_eval is not None:
        x, y = x[:max_eval], y[:max_eval]
    return x, y


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_file(run_dir: Path, entry: dict) -> Path:
    """Return the model's path after checking it exists and matches its recorded size and sha256.

    Raises:
        Skip: The file is missing, or differs from what metadata.json recorded (truncated, replaced).
    """
    rel = entry.get("file")
    if not isinstance(rel, str) or not rel:
        raise Skip("metadata entry has no 'file'")
    path = run_dir / rel
    if not path.is_file():
        raise Skip(f"file {rel} not found")
    size = path.stat().st_size
    expected_size = entry.get("size_bytes")
    if isinstance(expected_size, int) and size != expected_size:
        raise Skip(f"file size {size} B differs from metadata ({expected_size} B): truncated or replaced")
    expected_sha = entry.get("sha256")
    if expected_sha and sha256_file(path) != expected_sha:
        raise Skip("sha256 differs from metadata: the file was changed or damaged")
    return path


def model_format(entry: dict) -> str:
    fmt = entry.get("format")
    if fmt in ("tflite", "onnx"):
        return fmt
    suffix = Path(str(entry.get("file", ""))).suffix.lower()
    return {".tflite": "tflite", ".onnx": "onnx"}.get(suffix, str(fmt or suffix or "unknown"))


# ------------------------------------------------------------------------------------------ pre/post


def preprocess(x, entry: dict, meta: dict, np):
    """Apply the run's normalization, layout and input quantization to raw eval inputs.

    Args:
        x: Raw inputs, NCHW images in [0, 1] or (N, F) tabular rows.
        entry: The model's metadata entry.
        meta: The whole metadata.json (for run-level normalization).
        np: The numpy module.

    Returns:
        An array ready to feed the model, in its dtype and layout.
    """
    norm = entry.get("normalization") or meta.get("normalization") or {}
    xn = x
    if norm.get("mean") is not None and norm.get("std") is not None:
        mean = np.asarray(norm["mean"], dtype=np.float32).reshape(-1)
        std = np.asarray(norm["std"], dtype=np.float32).reshape(-1)
        # Statistics are per channel (NCHW) or per feature (NF): they broadcast over axis 1.
        shape = [1, -1] + [1] * (x.ndim - 2)
        xn = (x - mean.reshape(shape)) / std.reshape(shape)
    inp = entry.get("input") or {}
    if inp.get("layout") == "NHWC" and xn.ndim == 4:
        xn = xn.transpose(0, 2, 3, 1)
        shape = inp.get("shape") or []
        if xn.shape[-1] == 1 and len(shape) == 4 and shape[-1] == 3:
            xn = np.repeat(xn, 3, axis=-1)  # gray image, RGB (app-profile) input: R = G = B
    xn = np.ascontiguousarray(xn, dtype=np.float32)
    dtype = inp.get("dtype", "float32")
    quant = inp.get("quantization")
    if quant:
        np_dtype = {"int8": np.int8, "uint8": np.uint8}.get(dtype)
        if np_dtype is None:
            raise Skip(f"input quantization given for unsupported dtype {dtype}")
        info = np.iinfo(np_dtype)
        q = np.round(xn / float(quant["scale"]) + float(quant["zero_point"]))
        return np.clip(q, info.min, info.max).astype(np_dtype)
    if dtype not in ("float32", None):
        raise Skip(f"input dtype {dtype} without quantization parameters")
    return xn


def postprocess(out, entry: dict, np):
    """Dequantize a model output if needed and return the predicted class per row."""
    quant = (entry.get("output") or {}).get("quantization")
    out = np.asarray(out)
    if quant:
        out = (out.astype(np.float32) - float(quant["zero_point"])) * float(quant["scale"])
    return out.reshape(out.shape[0], -1).argmax(axis=1)


# ------------------------------------------------------------------------------------------- runners


class TFLiteRunner:
    """Runs one .tflite model with a TFLite interpreter (ai_edge_litert, tflite_runtime or tf.lite)."""

    def __init__(self, interpreter_cls, path: Path, entry: dict, threads: int, np):
        self.cls, self.path, self.entry, self.threads, self.np = interpreter_cls, path, entry, threads, np
        self.it = self._new()
        self._check_io()

    def _new(self, builtin_kernels: bool = False):
        kwargs = {}
        if builtin_kernels:
            kwargs["experimental_op_resolver_type"] = builtin_resolver(self.cls)
        try:
            it = self.cls(model_path=str(self.path), num_threads=self.threads, **kwargs)
            it.allocate_tensors()
        except Exception as e:
            raise Skip(f"the runtime cannot load it ({_one_line(e)})") from None
        return it

    def _check_io(self):
        np = self.np
        d = self.it.get_input_details()
        if len(d) != 1:
            raise Skip(f"model has {len(d)} inputs; bench.py measures single-input classifiers")
        d = d[0]
        inp = self.entry.get("input") or {}
        want = np.dtype(inp.get("dtype", "float32"))
        if np.dtype(d["dtype"]) != want:
            raise Skip(f"metadata says input dtype {want}, the model expects {np.dtype(d['dtype'])}")
        q = inp.get("quantization")
        scale, zp = d.get("quantization", (0.0, 0))
        if q and (abs(scale - float(q["scale"])) > 1e-5 * abs(scale) or zp != int(q["zero_point"])):
            raise Skip(f"metadata input quantization {q} differs from the model's (scale={scale}, zp={zp})")
        self.in_index = d["index"]
        self.in_shape = [int(s) for s in d["shape"]]
        sig = d.get("shape_signature")
        self.dynamic_batch = sig is not None and len(sig) > 0 and int(sig[0]) == -1
        out = self.it.get_output_details()[0]
        want_out = (self.entry.get("output") or {}).get("dtype")
        if want_out and np.dtype(out["dtype"]) != np.dtype(want_out):
            # Dequantizing a float output (or not dequantizing an int8 one) would give wrong predictions.
            raise Skip(f"metadata says output dtype {want_out}, the model produces {np.dtype(out['dtype'])}")
        self.out_index = out["index"]

    def run1(self, x1, it=None):
        it = it or self.it
        it.set_tensor(self.in_index, x1)
        it.invoke()
        return it.get_tensor(self.out_index)

    def check_input(self, xs):
        """Raise :class:`Skip` when the preprocessed eval inputs cannot feed this model."""
        if list(xs.shape[1:]) != self.in_shape[1:]:
            raise Skip(f"eval input shape {list(xs.shape[1:])} does not match the model's {self.in_shape[1:]}"
                       " (check the input layout in metadata.json)")

    def predict_all(self, xs, builtin_kernels: bool = False):
        """Predicted classes for ``xs``; ``builtin_kernels`` runs TFLite's own kernels (no XNNPACK delegate)."""
        np = self.np
        if not self.dynamic_batch:
            # A fixed batch of 1 cannot be resized safely: reshapes baked into the graph would silently
            # mix samples, so run one sample at a time.
            it = self._new(True) if builtin_kernels else self.it
            return np.concatenate([postprocess(self.run1(xs[i:i + 1], it), self.entry, np) for i in range(len(xs))])
        preds = []
        it = self._new(builtin_kernels)
        for start in range(0, len(xs), EVAL_CHUNK):
            chunk = xs[start:start + EVAL_CHUNK]
            it.resize_tensor_input(self.in_index, list(chunk.shape))
            it.allocate_tensors()
            it.set_tensor(self.in_index, chunk)
            it.invoke()
            preds.append(postprocess(it.get_tensor(self.out_index), self.entry, np))
        return np.concatenate(preds)


class OnnxRunner:
    """Runs one .onnx model with onnxruntime on the CPU."""

    def __init__(self, ort, path: Path, entry: dict, threads: int, np):
        self.entry, self.np = entry, np
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # onnxruntime warnings about unused initializers are noise here
        try:
            self.sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise Skip(f"the runtime cannot load it ({_one_line(e)})") from None
        inputs = self.sess.get_inputs()
        if len(inputs) != 1:
            raise Skip(f"model has {len(inputs)} inputs; bench.py measures single-input classifiers")
        want = (self.entry.get("input") or {}).get("dtype", "float32")
        onnx_type = {"float32": "tensor(float)", "int8": "tensor(int8)", "uint8": "tensor(uint8)"}.get(want)
        if inputs[0].type != onnx_type:
            raise Skip(f"metadata says input dtype {want}, the model expects {inputs[0].type}")
        self.in_name = inputs[0].name
        self.in_shape = list(inputs[0].shape)
        self.dynamic_batch = not isinstance(self.in_shape[0], int) or self.in_shape[0] < 0
        self.out_name = self.sess.get_outputs()[0].name

    def run1(self, x1):
        return self.sess.run([self.out_name], {self.in_name: x1})[0]

    def check_input(self, xs):
        """Raise :class:`Skip` when the preprocessed eval inputs cannot feed this model."""
        fixed = list(self.in_shape[1:])
        if all(isinstance(s, int) for s in fixed) and list(xs.shape[1:]) != fixed:
            raise Skip(f"eval input shape {list(xs.shape[1:])} does not match the model's {fixed}"
                       " (check the input layout in metadata.json)")

    def predict_all(self, xs):
        np = self.np
        step = EVAL_CHUNK if self.dynamic_batch else 1
        return np.concatenate([postprocess(self.run1(xs[i:i + step]), self.entry, np)
                               for i in range(0, len(xs), step)])


# --------------------------------------------------------------------------------------------- measure


def measure_latency(runner, x1, warmup: int, runs: int, np) -> dict:
    """Time ``runs`` batch-1 inferences after ``warmup`` untimed ones.

    Each timing covers feeding the input, invoking and reading the output back: the cost an app pays.
    """
    for _ in range(warmup):
        runner.run1(x1)
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter()
        runner.run1(x1)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "min_ms": round(float(ms.min()), 4),
        "max_ms": round(float(ms.max()), 4),
    }


def bench_model(entry: dict, meta: dict, run_dir: Path, runtimes: dict, x, y, args, np) -> dict:
    """Measure one model; raises :class:`Skip` when it cannot be run here."""
    fmt = model_format(entry)
    if fmt not in ("tflite", "onnx"):
        raise Skip(f"unknown model format '{fmt}'")
    if fmt not in runtimes:
        if args.runtime == "auto":
            raise Skip(f"no {fmt} runtime installed ({INSTALL_HINT[fmt]})")
        raise Skip(f"format {fmt} is not run by runtime '{args.runtime}'")
    path = check_model_file(run_dir, entry)
    rt_name, rt_version, handle = runtimes[fmt]
    runner_cls = TFLiteRunner if fmt == "tflite" else OnnxRunner
    runner = runner_cls(handle, path, entry, args.threads, np)
    xs = preprocess(x, entry, meta, np)
    runner.check_input(xs)
    try:
        latency = measure_latency(runner, xs[:1], args.warmup, args.runs, np)
        preds = runner.predict_all(xs)
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"inference failed ({_one_line(e)})") from None
    accuracy = float((preds == y).mean())
    result = {
        "model": Path(entry["file"]).stem,
        "file": entry["file"],
        "format": fmt,
        "precision": entry.get("precision"),
        "accuracy": round(accuracy, 6),
        "n_eval": int(len(y)),
    }
    if fmt == "tflite" and entry.get("precision") in INTEGER_PRECISIONS and builtin_resolver(handle) is not None:
        # The default XNNPACK kernels and TFLite's built-in kernels round int8 requantization differently, so
        # a borderline sample can get another prediction. The built-in kernels are fixed-point code that does
        # not depend on the CPU: within one TFLite release this accuracy is the same on every machine; the
        # default one is what an app using the runtime's defaults gets.
        try:
            ref = runner.predict_all(xs, builtin_kernels=True)
        except Skip:
            raise
        except Exception as e:
            raise Skip(f"inference with the built-in kernels failed ({_one_line(e)})") from None
        result["accuracy_builtin"] = round(float((ref == y).mean()), 6)
        result["differs_from_builtin"] = int((ref != preds).sum())
    result.update(latency)
    result.update({"threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                   "runtime": rt_name, "runtime_version": rt_version, "emulated": bool(args.emulated)})
    return result


# ---------------------------------------------------------------------------------------------- device


def cpu_model() -> str:
    """Best-effort CPU description: Raspberry Pi model line, x86 model name, or platform.processor()."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model", "model name", "hardware", "cpu model", "processor"):
        value = fields.get(key)
        if value and not value.isdigit():
            return value
    if fields.get("cpu part"):
        return f"ARM CPU part {fields['cpu part']} (implementer {fields.get('cpu implementer', '?')})"
    return platform.processor() or "unknown"


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def device_info(runtimes: dict, emulated: bool) -> dict:
    names = [runtimes[f][0] for f in ("tflite", "onnx") if f in runtimes]
    versions = [runtimes[f][1] for f in ("tflite", "onnx") if f in runtimes]
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "os": os_name(),
        "python": platform.python_version(),
        "runtime": ",".join(names),
        "runtime_version": ",".join(versions),
        "emulated": bool(emulated),
    }


# ------------------------------------------------------------------------------------------------ main


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory (exported/<run>) or a bundle folder holding metadata.json")
    p.add_argument("--runtime", choices=["tflite", "onnx", "auto"], default="auto",
                   help="which runtime to use; auto runs every model whose runtime is installed")
    p.add_argument("--threads", type=_positive_int, default=min(4, os.cpu_count() or 1),
                   help="CPU threads for inference (default: cores, at most 4)")
    p.add_argument("--runs", type=_positive_int, default=100, help="timed batch-1 inferences (default 100)")
    p.add_argument("--warmup", type=_non_negative_int, default=10, help="untimed warm-up inferences (default 10)")
    p.add_argument("--max-eval", type=_positive_int, default=None,
                   help="use only the first N eval samples for accuracy (default: all)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON to this file")
    p.add_argument("--emulated", action="store_true",
                   help="mark latencies as measured under emulation (set by emulate_pi.sh)")
    return p.parse_args(argv)


def write_json(path: Path, report: dict) -> None:
    """Write the report atomically, so a reader never sees half a file."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def print_table(report: dict) -> None:
    tag = " (EMULATED: latency is not representative)" if report["device"]["emulated"] else ""
    dev = report["device"]
    print(f"device: {dev['machine']} | {dev['cpu_model']} | {dev['cores']} cores | {dev['os']}{tag}")
    print(f"{'model file':<30} {'runtime':<15} {'thr':>3} {'accuracy':>9} {'builtin':>9} {'p50 ms':>9} "
          f"{'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for r in report["results"]:
        builtin = r.get("accuracy_builtin")
        builtin = "-" if builtin is None else f"{builtin:.4f}"
        print(f"{r.get('file', r['model']):<30} {r['runtime']:<15} {r['threads']:>3} {r['accuracy']:>9.4f} "
              f"{builtin:>9} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['mean_ms']:>9.3f}")
    if any("accuracy_builtin" in r for r in report["results"]):
        print("builtin: accuracy with TFLite's built-in kernels (no XNNPACK delegate)")
    for s in report["skipped"]:
        print(f"skipped {s.get('file') or s['model']}: {s['reason']}")


def run(args) -> dict:
    """Benchmark every model of the run directory; returns the report dict."""
    try:
        import numpy as np
    except ImportError:
        raise BadInput("numpy is not installed: pip install \"numpy<2\"") from None
    run_dir = Path(args.run_dir)
    meta = load_metadata(run_dir)
    x, y = load_eval(run_dir, np, args.max_eval)
    runtimes = resolve_runtimes(args.runtime)
    results, skipped = [], []
    for entry in meta["models"]:
        name = Path(str(entry.get("file", "?"))).stem if isinstance(entry, dict) else "?"
        if not isinstance(entry, dict):
            skipped.append({"model": name, "reason": "metadata entry is not an object"})
            continue
        try:
            results.append(bench_model(entry, meta, run_dir, runtimes, x, y, args, np))
        except Skip as e:
            skipped.append({"model": name, "file": entry.get("file"), "reason": str(e)})
        except Exception as e:  # a malformed metadata entry (missing key, statistics of the wrong length)
            skipped.append({"model": name, "file": entry.get("file"),
                            "reason": f"bad metadata entry ({type(e).__name__}: {_one_line(e)})"})
    return {
        "schema_version": SCHEMA_VERSION,
        "run": meta.get("run"),
        "device": device_info(runtimes, args.emulated),
        "results": results,
        "skipped": skipped,
    }


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
        if args.json_out:
            write_json(Path(args.json_out), report)
    except BadInput as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. --json into a read-only folder
        print(f"bench.py: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_table(report)
    if not report["results"]:
        print("bench.py: error: no model could be measured (see skipped above)", file=sys.stderr)
        return EXIT_ALL_SKIPPED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
