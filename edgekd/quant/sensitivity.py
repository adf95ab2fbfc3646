"""Per-layer int8 sensitivity: which layer of a file costs the accuracy when it is quantized.

For every quantizable layer of a fp32 file (:mod:`edgekd.quant.selective`), two files are written and run on the
validation split in the format's own runtime: the file with *only that layer* int8, and the file with *every
layer but that one* int8. Each is compared with the fp32 file: accuracy drop in percentage points, and the
output error of the logits as SNR (dB) and mean cosine similarity.

Ranking (most sensitive first) follows the accuracy-control design of NNCF/OpenVINO POT: a layer ranks by what
keeping it float buys when everything else is int8, so a greedy search that keeps layers float in ranking order
(:mod:`edgekd.quant.mixed`) reverts the most useful layer first. What it buys is measured on the logits (the SNR
of the all-but-one file), then on accuracy: on a validation split of a few hundred samples one sample moves
accuracy by a fraction of a point, so accuracy alone ranks layers by noise, while the output error is continuous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edgekd.quant.selective import Layer, SelectiveRoute

SCHEMA_VERSION = 1
# Samples of the per-tensor comparison (every tensor of both files is kept per sample).
TENSOR_SAMPLES = 64
Log = Callable[[str], None]


def output_error(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """SNR in dB (signal: the reference logits; noise: the difference) and the mean per-sample cosine."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    out = np.asarray(logits, np.float64).reshape(len(logits), -1)
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref ** 2).sum())
    snr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, (ref * out).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    return {"snr_db": round(min(snr, 999.0), 3), "cosine": round(float(cos.mean()), 6)}


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == y).mean())


@dataclass
class Measured:
    """One file's validation figures against the fp32 file of the same format and runtime."""

    accuracy: float
    drop_points: float  # 100 * (fp32 accuracy - accuracy): positive is worse
    snr_db: float
    cosine: float

    def to_json(self) -> dict[str, float]:
        return {"accuracy": round(self.accuracy, 6), "drop_points": round(self.drop_points, 4),
                "snr_db": self.snr_db, "cosine": self.cosine}


class Evaluator:
    """Runs candidate files of one route on the validation split and measures them against the fp32 file."""

    def __init__(self, route: SelectiveRoute, x_raw: np.ndarray, y: np.ndarray):
        self.route, self.x, self.y = route, x_raw, y
        self.reference = route.logits(route.fp32_path, x_raw)
        self.fp32_accuracy = accuracy(self.reference, y)
        self.count = 0

    def measure(self, *, keep_float: list[str] | tuple[str, ...] = (), only: list[str] | None = None,
                keep: str | None = None) -> Measured:
        """Write the candidate (see :meth:`SelectiveRoute.write`), run it, compare it; ``keep`` saves it there."""
        path = self.route.work / f"candidate{self.route.suffix}"
        self.route.write(path, keep_float=keep_float, only=only)
        logits = self.route.logits(path, self.x)
        self.count += 1
        if keep is not None:
            path.replace(keep)
        acc = accuracy(logits, self.y)
        err = output_error(self.reference, logits)
        return Measured(acc, 100.0 * (self.fp32_accuracy - acc), err["snr_db"], err["cosine"])


@dataclass
class LayerSensitivity:
    layer: Layer
    only: Measured  # only this layer int8
    all_but: Measured  # every layer int8 but this one
    rank: int = 0
    in_full: dict[str, float] | None = None  # its own output's error in the full int8 file (where measured)

    def to_json(self, full: Measured) -> dict[str, Any]:
        out = {"rank": self.rank, "name": self.layer.name, "op": self.layer.op, "key": self.layer.key,
               "only_int8": self.only.to_json(), "all_but_int8": self.all_but.to_json(),
               "recovered_points": round(full.drop_points - self.all_but.drop_points, 4)}
        if self.in_full:
            out["output_in_int8"] = self.in_full
        return out


@dataclass
class Sensitivity:
    """The sensitivity of one file: fp32 and full int8 figures, every layer's, and the ranking."""

    format: str
    file: str
    tool: str
    runtime: str
    samples: int
    fp32_accuracy: float
    full: Measured
    layers: list[LayerSensitivity] = field(default_factory=list)  # in ranking order
    seconds: float = 0.0

    def ranking(self) -> list[Layer]:
        return [s.layer for s in self.layers]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "quantizer": self.tool, "runtime": self.runtime,
                "samples": self.samples, "fp32_accuracy": round(self.fp32_accuracy, 6),
                "int8": self.full.to_json(), "seconds": round(self.seconds, 2),
                "layers": [s.to_json(self.full) for s in self.layers]}


def rank_key(s: LayerSensitivity) -> tuple[float, float, float]:
    """Sort key, most sensitive first: the output SNR with the layer kept float (rest int8), then that file's
    accuracy, then how much output error the layer alone causes."""
    return (-s.all_but.snr_db, -s.all_but.accuracy, s.only.snr_db)


def measure_sensitivity(route: SelectiveRoute, x_raw: np.ndarray, y: np.ndarray, file: str,
                        log: Log | None = None, evaluator: Evaluator | None = None) -> Sensitivity:
    """Measure every layer of ``route``'s file on ``(x_raw, y)`` (the validation split) and rank them.

    Args:
        route: The format's selective int8 route over the fp32 file.
        x_raw: Raw validation inputs (the runtime entry normalizes them, as for every file).
        y: Their labels.
        file: The fp32 file's name, for the record.
        log: Receives one progress line per layer.
        evaluator: An evaluator already made for this route and data (reused by the mixed search).
    """
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    ev = evaluator or Evaluator(route, x_raw, y)
    full_path = route.work / f"full{route.suffix}"
    full = ev.measure(keep=full_path)
    in_full = route.tensor_errors(full_path, x_raw[:TENSOR_SAMPLES])
    layers = route.layers()
    out = []
    for i, layer in enumerate(layers, 1):
        s = LayerSensitivity(layer, only=ev.measure(only=[layer.key]), all_but=ev.measure(keep_float=[layer.key]),
                             in_full=in_full.get(layer.key))
        out.append(s)
        log(f"  {route.format} {i}/{len(layers)} {layer.name}: only it int8 {-s.only.drop_points:+.2f} points, "
            f"all but it {-s.all_but.drop_points:+.2f}")
    out.sort(key=rank_key)
    for rank, s in enumerate(out, 1):
        s.rank = rank
    return Sensitivity(route.format, file, route.tool, route.runtime, len(y), ev.fp32_accuracy, full, out,
                       time.perf_counter() - t0)


def top_lines(sens: Sensitivity, top: int = 5) -> list[str]:
    """Console lines: the file's fp32 and full int8 figures, then its ``top`` most sensitive layers."""
    f = sens.full
    lines = [f"{sens.file} ({sens.tool}, {sens.runtime}, {sens.samples} validation samples): fp32 "
             f"{sens.fp32_accuracy:.4f}, all int8 {f.accuracy:.4f} ({-f.drop_points:+.2f} points, SNR "
             f"{f.snr_db:.1f} dB, cosine {f.cosine:.4f}); most sensitive layers:"]
    for s in sens.layers[:top]:
        lines.append(f"  {s.rank:2d}. {s.layer.name:40s} kept float: {-s.all_but.drop_points:+.2f} points "
                     f"(SNR {s.all_but.snr_db:.1f} dB); only it int8: {-s.only.drop_points:+.2f} points "
                     f"(SNR {s.only.snr_db:.1f} dB)")
    return lines
