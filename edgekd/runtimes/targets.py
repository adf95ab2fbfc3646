"""The model files of a run and the runtime that runs each: what ``validate`` and ``bench`` both measure.

A library (below the stages): it reads the run directory (``*.pt`` checkpoints, ``metadata.json``) and pairs
each file with a runtime, checks those files against their sha256 records, and checks runtime names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError, RunDirError
from edgekd.results import REFERENCE_MODELS
from edgekd.run_dir import RunDir, read_metadata, sha256_file
from edgekd.runtimes.base import get_runtime, list_runtimes, runtimes_for

# Roles the distill stage writes, in the order tables list them; other checkpoints (a pruned student) follow.
_ROLE_ORDER = ("teacher", "baseline", "student")


@dataclass
class ModelTarget:
    """One model file of a run and the runtime that runs it."""

    file: str
    source_model: str  # the model it was made from: teacher, baseline, student, student_pruned...
    runtime: str
    format: str
    precision: str
    entry: dict[str, Any] = field(repr=False)

    @property
    def stem(self) -> str:
        return Path(self.file).stem

    @property
    def is_student(self) -> bool:
        return self.source_model not in REFERENCE_MODELS


def runtime_names_for(file: str) -> list[str]:
    """Names of the runtimes that run ``file`` (by suffix): the installed ones, else the registered ones (which
    then report why they cannot run it, as a skipped row)."""
    return [cls.name for cls in runtimes_for(file) or runtimes_for(file, installed_only=False)]


def _checkpoint_targets(rd: RunDir, data: dict[str, Any]) -> list[ModelTarget]:
    """The PyTorch checkpoints of the run, teacher/baseline/student first, with an entry built from data.json."""
    norm = data.get("normalization") or {}
    input_shape = [int(s) for s in data.get("input_shape", [])]
    order = {r: i for i, r in enumerate(_ROLE_ORDER)}
    targets = []
    for p in sorted(rd.path.glob("*.pt"), key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        entry = {"file": p.name, "model": p.stem, "format": "pt", "precision": "fp32",
                 "input": {"shape": [1, *input_shape], "dtype": "float32", "layout": data.get("layout", "NCHW"),
                           "quantization": None},
                 "output": {"dtype": "float32", "quantization": None}, "normalization": norm}
        targets += [ModelTarget(p.name, p.stem, rt, "pt", "fp32", entry) for rt in runtime_names_for(p.name)]
    return targets


def _exported_targets(rd: RunDir, data: dict[str, Any]) -> list[ModelTarget]:
    """Every file of ``metadata.json`` that a runtime runs."""
    meta = read_metadata(rd)
    targets = []
    for entry in (meta or {}).get("models", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise RunDirError(f"{rd / 'metadata.json'}: a model entry has no 'file'", "run `edgekd export` again")
        if not entry["file"] or Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
            raise RunDirError(f"{rd / 'metadata.json'}: model file {entry['file']!r} is not a file name inside the run",
                              "run `edgekd export` again")
        entry = dict(entry)
        # The contract allows normalization at the top level only; runtimes read it from the entry.
        entry.setdefault("normalization", meta.get("normalization") or data.get("normalization") or {})
        fmt = entry.get("format") or Path(entry["file"]).suffix.lstrip(".")
        for runtime in runtime_names_for(entry["file"]):  # every runtime that runs the file: one target each
            targets.append(ModelTarget(entry["file"], str(entry.get("model") or Path(entry["file"]).stem.split("_")[0]),
                                       runtime, fmt, str(entry.get("precision", "fp32")), entry))
    return targets


def discover_models(rd: RunDir, runtimes: list[str] | None = None) -> list[ModelTarget]:
    """Every model of a run: the PyTorch checkpoints (``*.pt``) and every file in ``metadata.json``.

    Args:
        rd: The run directory.
        runtimes: Keep only models these runtimes run (None: all).

    Raises:
        RunDirError: The run holds no model (or none for the chosen runtimes).
    """
    data = rd.data_info()
    targets = _checkpoint_targets(rd, data) + _exported_targets(rd, data)
    if runtimes is not None:
        targets = [t for t in targets if t.runtime in runtimes]
    if not targets:
        which = f" for runtime(s) {', '.join(runtimes)}" if runtimes else ""
        raise RunDirError(f"{rd.path} holds no models{which}",
                          "run `edgekd distill` (and `edgekd export` for ONNX/TFLite files) first")
    return targets


def check_inputs(rd: RunDir, targets: list[ModelTarget]) -> None:
    """Before using them, check the files of ``targets`` and the run files they rely on against their records.

    Every model file is compared with the sha256 (and size) in ``manifest.json`` and, for exported files, the
    sha256 in ``metadata.json``; so are ``eval.npz``, ``data.json``, ``recipe.yaml``, ``metadata.json``, an ONNX
    model's external-data file and the PyTorch teacher and student that agreement is measured against.

    Raises:
        ArtifactChanged: A file was changed or truncated since it was written (exit code 1), naming each one.
        RunDirError: A file the manifest records is missing (exit code 2).
    """
    names = ["eval.npz", "data.json", "recipe.yaml", "metadata.json", "teacher.pt", "student.pt"]
    expected: dict[str, str] = {}
    for t in targets:
        names.append(t.file)
        if t.format == "onnx":
            names.append(t.file + ".data")
        sha = t.entry.get("sha256")
        if t.format != "pt" and isinstance(sha, str):
            expected[t.file] = sha
    rd.check_artifacts(names, expected)


def integrity_problem(rd: RunDir, target: ModelTarget) -> str | None:
    """Why a file cannot be trusted (missing, or changed since export), or None."""
    p = rd / target.file
    if not p.is_file():
        return f"{target.file} not found"
    sha = target.entry.get("sha256")
    if sha and sha256_file(p) != sha:
        return f"{target.file} changed since it was exported (sha256 differs from metadata.json)"
    return None


def parse_runtimes(text: str | list[str] | None) -> list[str] | None:
    """``"onnxruntime,litert"`` → a checked list (None: every runtime)."""
    if text is None:
        return None
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    for name in items:
        get_runtime(name)  # unknown names fail here, with the closest registered name
    if not items:
        raise EdgeKDError("--runtime is empty", f"choose from: {', '.join(list_runtimes())}")
    return items
