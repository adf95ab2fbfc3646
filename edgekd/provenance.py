"""How a results file was made: the ``provenance`` block every benchmark writes (after MLPerf's result logs).

A benchmark calls :func:`start` before it measures anything and :meth:`Provenance.finish` when it writes its
results; the block goes into the results JSON under ``"provenance"`` and :func:`markdown` prints it in the
results ``.md``. The block holds the command line (paths inside the repository made relative to it), the git
commit and whether the code differed from it, the CPU model and core count, the versions of torch, onnxruntime
and LiteRT (``ai-edge-litert``), the thread settings, the load average before and after, and the dates.

Only the standard library is used, so a benchmark pays nothing for it and the block can be written anywhere.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The distributions whose versions decide the numbers (LiteRT is the ai-edge-litert distribution).
PACKAGES = ("torch", "onnxruntime", "ai-edge-litert")
# Results files are rewritten by the very runs being recorded: their changes do not make the code "dirty".
_NOT_CODE = ":(exclude)benchmarks/results"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` or the machine type elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    """Installed versions of torch, onnxruntime and ai-edge-litert (None where not installed), without importing them."""
    out: dict[str, str | None] = {}
    for dist in PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_state(root: str | os.PathLike = REPO) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git work tree at ``root``.

    Dirty means a tracked file outside ``benchmarks/results/`` differs from the commit (untracked files and
    results files rewritten by the run do not count). Both are None outside a git work tree or without git.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", _NOT_CODE))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def repo_path(arg: str | os.PathLike, root: str | os.PathLike = REPO) -> str:
    """``arg`` relative to ``root`` when it is a path inside it; a path outside it keeps only its last two parts
    (a results file must not hold this machine's folders); anything else unchanged."""
    arg = str(arg)
    p = Path(arg)
    if not (p.is_absolute() or p.exists()):
        return arg
    try:
        root = Path(root).resolve()
        if p.resolve().is_relative_to(root):
            return Path(os.path.relpath(p.resolve(), root)).as_posix()
    except (OSError, ValueError):
        return arg
    return Path(*p.parts[-2:]).as_posix() if p.is_absolute() else arg


def command_line(argv: list[str] | None = None, root: str | os.PathLike = REPO) -> str:
    """The command as one shell line: ``python`` and the script, with paths inside ``root`` made relative to it."""
    argv = list(sys.argv if argv is None else argv)
    script = argv[0] if argv else ""
    head = (["python", "-m", "pytest"] if script.endswith(("pytest", "pytest/__main__.py"))
            else ["python", repo_path(script, root)])
    return shlex.join(head + [repo_path(a, root) for a in argv[1:]])


def _threads(threads: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"setting": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")  # only when the benchmark imported it: reading it must not load torch
    if torch is not None and hasattr(torch, "get_num_threads"):
        out["torch"] = torch.get_num_threads()
    return out


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on every platform
        return None


@dataclass
class Provenance:
    """A benchmark's provenance, begun at :func:`start` and completed by :meth:`finish`."""

    argv: list[str]
    threads: Any = None
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    load_before: list[float] | None = field(default_factory=_load)
    root: Path = REPO

    def finish(self, threads: Any = None) -> dict[str, Any]:
        """The ``provenance`` block, with the load average now as ``load_after``.

        Args:
            threads: The thread setting the figures were measured with, when it was only known later
                (a number, a list of numbers, or a short description); overrides the one given to :func:`start`.
        """
        ended = datetime.now(timezone.utc)
        return {"command": command_line(self.argv, self.root), **git_state(self.root),
                "cpu_model": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                "python": platform.python_version(), "versions": package_versions(),
                "threads": _threads(self.threads if threads is None else threads),
                "load_before": self.load_before, "load_after": _load(),
                "started": self.started.isoformat(timespec="seconds"), "date": ended.isoformat(timespec="seconds"),
                "seconds": round((ended - self.started).total_seconds(), 1)}


def start(threads: Any = None, argv: list[str] | None = None, root: str | os.PathLike = REPO) -> Provenance:
    """Begin a benchmark's provenance: the time and load average now, the command line it was started with.

    Args:
        threads: The thread setting the benchmark measures with (number, list, or description).
        argv: The command line (default ``sys.argv``).
        root: The repository whose commit is recorded and to which paths are made relative.
    """
    return Provenance(argv=list(sys.argv if argv is None else argv), threads=threads, root=Path(root).resolve())


def _loads(v: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in v) if v else "?"


def markdown(block: dict[str, Any] | None) -> str:
    """The block as a short Markdown section for a results ``.md`` ("" for None)."""
    if not block:
        return ""
    commit = block.get("commit")
    state = "unknown commit" if not commit else f"commit {commit[:12]}" + (" (uncommitted changes)" if block.get("dirty") else "")
    versions = ", ".join(f"{k} {v}" for k, v in (block.get("versions") or {}).items() if v) or "-"
    t = block.get("threads") or {}
    threads = [f"setting {t['setting']}"] if t.get("setting") is not None else []
    threads += [f"{k} {t[k]}" for k in ("OMP_NUM_THREADS", "torch") if t.get(k) is not None]
    return "\n".join([
        "## Provenance", "",
        f"- command: `{block.get('command', '?')}`",
        f"- code: {state}",
        f"- machine: {block.get('cpu_model', '?')}, {block.get('cores', '?')} cores ({block.get('machine', '?')}); "
        f"Python {block.get('python', '?')}; {versions}",
        f"- threads: {', '.join(threads) or 'not recorded'}",
        f"- load average (1/5/15 min): {_loads(block.get('load_before'))} before, {_loads(block.get('load_after'))} after",
        f"- run: {block.get('started', '?')} to {block.get('date', '?')} ({block.get('seconds', '?')} s)", ""])
