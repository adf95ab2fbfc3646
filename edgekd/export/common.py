"""Helpers shared by the backends: quiet conversions, operator-naming errors, tool versions, the pixel scale."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator

from edgekd.errors import ExportError

# Raw image inputs are pixels / 255 (0..1); app-profile files take 0..255 pixels, and metadata gives the
# normalization in both units.
PIXEL_SCALE = 255.0

# Where converters name the operator they could not handle, most specific first.
_OP_PATTERNS = [
    re.compile(r"Lowering not found: (aten\.[\w.]+)"),
    re.compile(r"No ONNX function found for <OpOverload\(op='(aten\.[\w]+)', overload='(\w+)'\)>"),
    re.compile(r"target=torch\.ops\.(aten\.[\w.]+)"),
    re.compile(r"Didn't find op for builtin opcode '(\w+)'"),
    re.compile(r"Unsupported op(?:erator)?:? '?([\w.]+)'?"),
    re.compile(r"(aten\.[a-z_0-9]+(?:\.[a-z_0-9]+)?)"),
]


def operator_in(text: str) -> str | None:
    """The operator a converter or runtime error message names, if any (``aten.histc.default``)."""
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            return ".".join(g for g in m.groups() if g)
    return None


def _full_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def conversion_error(fmt: str, what: str, e: BaseException, tool: str) -> ExportError:
    """An :class:`ExportError` naming the format, the model and, when found, the operator that failed.

    Args:
        fmt: What was being written, e.g. ``tflite`` or ``onnx int8``.
        what: The model or source file.
        e: The converter's exception (its causes are searched too).
        tool: The converter, for the message.
    """
    text = _full_text(e)
    op = operator_in(text)
    if op:
        return ExportError(f"{fmt} conversion of {what} failed: operator {op} is not supported by {tool}",
                           "replace that operation in the model, or export the other format only")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return ExportError(f"{fmt} conversion of {what} failed in {tool}: {type(e).__name__}: {first[:200]}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stdout/stderr at the file-descriptor level (converters print from C++ and rich consoles).

    The converters' chatter (MLIR pass logs, progress bars) hides edgekd's own output; errors still surface
    as exceptions, which callers turn into one-line messages. ``EDGEKD_VERBOSE=1`` keeps the output.
    """
    if os.environ.get("EDGEKD_VERBOSE"):
        yield
        return
    old_env = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    try:
        with tempfile.TemporaryFile() as sink:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters): nothing to silence
                    pass
            try:
                # Python-level writes: a StringIO, never closed, so a logging handler created meanwhile
                # (torchao adds one on import) does not fail later on a closed stream.
                with contextlib.redirect_stdout(io.StringIO()):
                    yield
            finally:
                for fd, dup in saved:
                    os.dup2(dup, fd)
                    os.close(dup)
    finally:
        if old_env is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old_env


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def tool_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Versions of torch and of the installed distributions ``names`` (recorded in metadata.json)."""
    import torch

    out = {"torch": torch.__version__}
    for name in names:
        v = _version(name)
        if v:
            out[name] = v
    return out
