"""The run directory ``exported/<run-name>/``: paths, atomic writes, ``manifest.json`` and ``metrics.json``.

Every stage reads what it needs from here and writes its own artifacts plus its section of the manifest.
Files are written under a temporary name and renamed, so an interrupted stage never leaves a half-written
artifact that a later stage (or an app) could pick up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgekd.errors import ArtifactChanged, RunDirError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
# The pruned student's name: its checkpoint (``student_pruned.pt``), its metrics.json key, its files' stem.
PRUNED_STUDENT = "student_pruned"


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix, because some writers (torch.onnx, litert) choose the format
    from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write pretty JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in metrics; JSON has no type for them.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """Read a JSON file, turning a corrupt file into a :class:`RunDirError`.

    Args:
        path: The file.
        expect: The type the top-level value must have (``dict`` for the run's bookkeeping files).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON (line {e.lineno}): it was damaged or edited by hand",
                          "delete the run directory and run the stage again") from e
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path} is not a text file: it was damaged or replaced",
                          "delete the run directory and run the stage again") from e
    if expect is not None and not isinstance(data, expect):
        names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                 bool: "true/false", type(None): "null"}
        raise RunDirError(f"{path} holds {names.get(type(data), type(data).__name__)}, not "
                          f"{names.get(expect, expect.__name__)}: it was damaged or edited by hand",
                          "delete the run directory and run the stage again")
    return data


def read_rows_report(path: Path, command: str) -> dict[str, Any]:
    """A stage's JSON report holding a ``rows`` list (``report.json``, ``validate.json``), or ``{}`` if absent.

    Args:
        path: The report file.
        command: The command that writes it, named in the error (``edgekd bench``).
    """
    if not path.exists():
        return {}
    data = read_json(path, dict)
    if not isinstance(data.get("rows", []), list):
        raise RunDirError(f"{path}: 'rows' is not a list: it was damaged or edited by hand", f"run `{command}` again")
    return data


def read_eval(rd: "RunDir") -> tuple[Any, Any]:
    """``(x raw float32, y int64)`` numpy arrays from the run's ``eval.npz`` (the raw test split)."""
    import numpy as np

    path = rd / "eval.npz"
    if not path.is_file():
        raise RunDirError(f"{path} not found", "run `edgekd distill` first")
    try:
        with np.load(path, allow_pickle=False) as d:
            x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"]).astype(np.int64).reshape(-1)
    except Exception as e:  # BadZipFile, KeyError, ValueError all mean the same to a user
        raise RunDirError(f"{path} cannot be read ({type(e).__name__})", "run `edgekd distill` again") from e
    if len(x) == 0 or len(x) != len(y):
        raise RunDirError(f"{path}: x has {len(x)} rows and y {len(y)}", "run `edgekd distill` again")
    return x, y


def read_metadata(rd: "RunDir") -> dict[str, Any] | None:
    """``metadata.json`` of a run (None before export), checked for a ``models`` list."""
    path = rd / "metadata.json"
    if not path.exists():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("models"), list):
        raise RunDirError(f"{path} has no 'models' list", "run `edgekd export` again")
    return meta


class RunDir:
    """One run directory and its bookkeeping files.

    Args:
        path: The directory (created on first write).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    # -- manifest -------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest: ``{"run": name, "stages": {stage: {...}}, "artifacts": {file: {sha256, size_bytes}}}``."""
        path = self.path / MANIFEST
        if not path.exists():
            return {"run": self.name, "created": _now(), "stages": {}, "artifacts": {}}
        manifest = read_json(path, dict)
        for key in ("stages", "artifacts"):
            if not isinstance(manifest.setdefault(key, {}), dict):
                raise RunDirError(f"{path}: '{key}' is not an object: the manifest was damaged or edited by hand",
                                  "delete the run directory and run the stages again")
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.path / MANIFEST, manifest)

    def record_artifacts(self, *names: str) -> None:
        """Record the sha256 and size of artifacts (file names relative to the run directory)."""
        manifest = self.manifest()
        for name in names:
            p = self.path / name
            manifest["artifacts"][name] = {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
        self._write_manifest(manifest)

    def forget_artifacts(self, *names: str) -> None:
        """Drop artifacts from the manifest (for files a stage removed)."""
        manifest = self.manifest()
        for name in names:
            manifest["artifacts"].pop(name, None)
        self._write_manifest(manifest)

    def stage_started(self, stage: str) -> None:
        manifest = self.manifest()
        entry = manifest["stages"].setdefault(stage, {})
        entry.update({"status": "running", "started": _now()})
        self._write_manifest(manifest)

    def stage_done(self, stage: str, **info: Any) -> None:
        """Mark a stage complete, with its artifacts and timings."""
        manifest = self.manifest()
        entry = manifest["stages"].setdefault(stage, {})
        entry.update({"status": "done", "finished": _now(), **info})
        self._write_manifest(manifest)

    def stage_status(self, stage: str) -> str | None:
        return self.manifest()["stages"].get(stage, {}).get("status")

    def verify_artifacts(self, names: list[str] | None = None) -> list[str]:
        """Return one message per recorded artifact that is missing or whose sha256 changed."""
        problems = []
        artifacts = self.manifest()["artifacts"]
        for name in names if names is not None else sorted(artifacts):
            expected = artifacts.get(name)
            p = self.path / name
            if expected is None:
                continue
            if not p.exists():
                problems.append(f"{name} is missing")
            elif sha256_file(p) != expected["sha256"]:
                problems.append(f"{name} changed since it was written (sha256 mismatch)")
        return problems

    def check_artifacts(self, names: Iterable[str], expected: dict[str, str] | None = None,
                        missing_ok: bool = False) -> None:
        """Check files a stage is about to use against their records; raise naming every file that fails.

        A file is checked when the manifest records it (sha256 and size) or ``expected`` gives its sha256
        (``metadata.json`` does for exported models); files with no record are not checked.

        Args:
            names: Files relative to the run directory.
            expected: Further sha256 records by file name.
            missing_ok: Do not complain about recorded files that are missing (the caller reports them).

        Raises:
            ArtifactChanged: A file's size or sha256 differs from its record (exit code 1).
            RunDirError: A recorded file is missing (exit code 2).
        """
        artifacts = self.manifest().get("artifacts", {})
        expected = expected or {}
        changed: list[tuple[str, str]] = []
        missing: list[str] = []
        for name in dict.fromkeys(names):
            record = artifacts.get(name) if isinstance(artifacts.get(name), dict) else {}
            shas = {s for s in (record.get("sha256"), expected.get(name)) if isinstance(s, str) and s}
            if not shas:
                continue
            p = self.path / name
            if not p.is_file():
                missing.append(name)
                continue
            size, recorded = p.stat().st_size, record.get("size_bytes")
            if isinstance(recorded, int) and size != recorded:
                changed.append((name, f"{size} bytes, {recorded} when written: truncated or replaced"))
            elif any(sha256_file(p) != s for s in shas):
                changed.append((name, "sha256 mismatch"))
        if changed:
            first = sorted({_writer(n) for n, _ in changed}, key=_STAGE_ORDER.index)[0]
            # The earliest stage that wrote a damaged file: re-running it rewrites everything after it too.
            again = ("for a new run" if first == "edgekd distill"
                     else f"to write {'it' if len(changed) == 1 else 'them'} again")
            what = "; ".join(f"{self.path / n} changed since it was written ({why})" for n, why in changed)
            raise ArtifactChanged(f"{what}: re-run `{first}` {again}, or restore the original"
                                  + ("" if len(changed) == 1 else "s"), files=[n for n, _ in changed])
        if missing and not missing_ok:
            commands = sorted({_writer(n) for n in missing}, key=_STAGE_ORDER.index)
            raise RunDirError(f"{', '.join(str(self.path / n) for n in missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing (recorded in {MANIFEST})",
                              f"re-run `{commands[0]}`, or pick another --run")

    # -- what distill and export left for the later stages -------------------------------------------------
    def data_info(self) -> dict[str, Any]:
        """``data.json``: labels, input shape, layout and normalization of the run's data."""
        path = self.path / "data.json"
        if not path.is_file():
            raise RunDirError(f"{path} not found: {self.path} is not a finished distill run", "run `edgekd distill` first")
        return read_json(path, dict)

    def model_size(self, file: str) -> int:
        """Bytes of a model file plus its ONNX external-data file, if any (what a device must store)."""
        p = self.path / file
        size = p.stat().st_size
        data = p.with_name(p.name + ".data")
        if p.suffix == ".onnx" and data.exists():
            size += data.stat().st_size
        return size

    # -- metrics --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        path = self.path / METRICS
        return read_json(path, dict) if path.exists() else {}

    def update_metrics(self, key: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into ``metrics.json[key]`` (one entry per model, stable keys)."""
        metrics = self.metrics()
        metrics.setdefault(key, {}).update(values)
        write_json_atomic(self.path / METRICS, metrics)


_STAGE_ORDER = ["edgekd distill", "edgekd prune", "edgekd export", "edgekd validate", "edgekd bench",
                "edgekd report"]


def _writer(name: str) -> str:
    """The command that writes a run artifact (what to re-run when it is damaged)."""
    base = Path(name).name
    if base == "metadata.json" or base.endswith((".onnx", ".tflite", ".onnx.data")):
        return "edgekd export"
    if base.startswith(PRUNED_STUDENT):
        return "edgekd prune"
    if base == "validate.json":
        return "edgekd validate"
    if base == "report.json":
        return "edgekd bench"
    if base.startswith("report"):
        return "edgekd report"
    return "edgekd distill"  # checkpoints, eval.npz, data.json, recipe.yaml: a new run


# How the manifest writes its times (``started``, ``finished``, ``created``), for strftime and strptime.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def _now() -> str:
    return time.strftime(TIME_FORMAT)


def latest_run(out_dir: str | os.PathLike) -> RunDir | None:
    """The most recently modified run directory (one holding a manifest) under ``out_dir``."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    runs = [p for p in out.iterdir() if (p / MANIFEST).is_file()]
    if not runs:
        return None
    return RunDir(max(runs, key=lambda p: (p / MANIFEST).stat().st_mtime))


def resolve_run(run: str | os.PathLike | None, out_dir: str | os.PathLike = "exported") -> RunDir:
    """The run a stage command works on: ``--run`` if given, else the latest run in ``out_dir``."""
    if run is not None:
        rd = RunDir(run)
        if not rd.path.is_dir():
            raise RunDirError(f"run directory {rd.path} does not exist", "pass --run with a directory from `edgekd distill`")
        if not rd.exists():
            raise RunDirError(f"{rd.path} is not an edgekd run directory (no {MANIFEST})",
                              "pass --run with a directory written by `edgekd distill`")
        return rd
    rd = latest_run(out_dir)
    if rd is None:
        raise RunDirError(f"no run found in {out_dir}", "run `edgekd distill` first, or pass --run DIR")
    return rd
