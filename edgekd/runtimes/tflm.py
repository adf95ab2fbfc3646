"""TensorFlow Lite for Microcontrollers (TFLM): the runtime a microcontroller firmware links.

The ``tflite-micro`` wheel (an optional dependency: ``pip install edgekd[mcu]``) is TFLM's C++ interpreter
built for the host, with the reference kernels and every builtin op registered. It runs a ``.tflite`` file
exactly as a board's firmware does (same kernels, same integer arithmetic; optimized kernels such as
CMSIS-NN or ESP-NN are bit-exact replacements), and it reports how much of the tensor arena the model needs.

Arena figures (:func:`measure_arena`):

* ``used``: the total of TFLM's ``RecordingMicroAllocator`` (head: the planned activation buffers, input and
  output tensors included; tail: persistent tensors, node structs, kernel buffers);
* ``minimum``: the smallest arena this interpreter initializes the model with, found by bisection. It is
  larger than ``used``: the allocator object and the temporary buffers of ``AllocateTensors`` also live in
  the arena.

Both come from a 64-bit host: pointers in TFLM's structs are 8 bytes here and 4 on a Cortex-M, so the tail
is smaller on a 32-bit board; optimized kernels may ask for scratch buffers the reference kernels do not.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from edgekd.errors import ExportError
from edgekd.runtimes.base import Runtime, installed, register_runtime

_INSTALL_HINT = "pip install 'edgekd[mcu]' (the tflite-micro wheel: Linux x86_64/aarch64, Python 3.10-3.12)"
# The bisection stops here: no microcontroller edgekd targets has more RAM than this.
_MAX_ARENA = 64 << 20


def tflm_module():
    """The ``tflite_micro.runtime`` module, or an :class:`ExportError` saying how to install it."""
    try:
        from tflite_micro import runtime
    except ImportError as e:
        raise ExportError("the MCU target needs the TensorFlow Lite Micro interpreter, which is not installed",
                          _INSTALL_HINT) from e
    return runtime


def tflm_version() -> str:
    """Version of the installed ``tflite-micro`` wheel."""
    from importlib.metadata import version

    return f"tflite-micro {version('tflite-micro')}"


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture what C++ code writes to file descriptor 2; the text lands in the yielded list on exit.

    TFLM reports allocation failures and ``PrintAllocations`` on stderr only, not through Python.
    """
    out: list[str] = []
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            out.append(sink.read().decode("utf-8", "replace"))


def load_interpreter(data: bytes, arena_size: int, what: str = "the model"):
    """A TFLM interpreter for ``data`` with an arena of ``arena_size`` bytes.

    Raises:
        ExportError: TFLM cannot initialize the model: an operator it lacks (named), or the arena is too
            small, or the file is damaged.
    """
    runtime = tflm_module()
    with captured_stderr() as err:
        try:
            return runtime.Interpreter.from_bytes(bytes(data), arena_size=int(arena_size))
        except (RuntimeError, ValueError) as e:
            failure = e
    text = f"{failure} {''.join(err)}"
    op = re.search(r"(?:Didn't find op for builtin opcode|unsupported op)\s*'?([A-Z0-9_]+)", text)
    if op:
        raise ExportError(f"{what} uses operator {op.group(1)}, which TensorFlow Lite Micro does not have",
                          "change the model so it avoids that operator") from failure
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(failure).__name__)
    raise ExportError(f"TensorFlow Lite Micro cannot load {what}: {first[:200]}") from failure


@dataclass(frozen=True)
class ArenaUse:
    """Tensor arena figures of one model (bytes), measured by TFLM on this host."""

    used: int
    head: int
    tail: int
    minimum: int

    def as_dict(self) -> dict[str, int]:
        return {"arena_used_bytes": self.used, "arena_head_bytes": self.head, "arena_tail_bytes": self.tail,
                "arena_min_bytes": self.minimum}


def _allocations(it) -> dict[str, int]:
    with captured_stderr() as err:
        it.print_allocations()
    found = dict(re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", "".join(err)))
    if "total" not in found:
        raise ExportError("TensorFlow Lite Micro reported no arena allocation (unexpected tflite-micro version)",
                          _INSTALL_HINT)
    return {k: int(v) for k, v in found.items()}


def _loads(data: bytes, size: int) -> bool:
    runtime = tflm_module()
    with captured_stderr():
        try:
            runtime.Interpreter.from_bytes(data, arena_size=size)
            return True
        except RuntimeError:
            return False


def measure_arena(data: bytes, what: str = "the model") -> ArenaUse:
    """Arena use of a model in TFLM: the allocator's total and the smallest arena that works.

    Args:
        data: The ``.tflite`` file's bytes.
        what: Name for error messages.

    Raises:
        ExportError: TFLM cannot load the model, even with a large arena.
    """
    data = bytes(data)
    big = max(len(data) * 10, 1 << 20)
    it = load_interpreter(data, big, what)
    alloc = _allocations(it)
    lo, hi = alloc["total"], big
    if _loads(data, lo):
        hi = lo
    # Bisection over sizes; each try only allocates (tens of microseconds to milliseconds).
    while lo < hi:
        mid = (lo + hi) // 2
        if _loads(data, mid):
            hi = mid
        else:
            lo = mid + 1
    return ArenaUse(alloc["total"], alloc.get("head", 0), alloc.get("tail", 0), hi)


@register_runtime
class TFLMRuntime(Runtime):
    """A full-integer ``.tflite`` file in the TensorFlow Lite Micro interpreter (one sample per invoke).

    It takes the MCU files (those the ``mcu`` backend wrote): the other .tflite files have float or named
    boundaries a microcontroller firmware does not feed, and LiteRT runs them.
    """

    name = "tflm"
    suffixes = (".tflite",)

    @classmethod
    def available(cls) -> bool:
        return installed("tflite_micro")

    @classmethod
    def accepts(cls, entry: dict[str, Any] | None) -> bool:
        return bool(entry) and (entry.get("backend") == "mcu" or entry.get("target") == "mcu")

    @classmethod
    def import_libraries(cls) -> None:
        tflm_module()

    def _load(self) -> None:
        data = self.path.read_bytes()
        self.interpreter = load_interpreter(data, max(len(data) * 10, 1 << 20), self.path.name)
        self._in = self.interpreter.get_input_details(0)

    def run(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        outs = []
        for i in range(x.shape[0]):
            # TFLM models have a fixed batch of 1, like the board runs them.
            it.set_input(np.ascontiguousarray(x[i:i + 1], dtype=self._in["dtype"]), 0)
            it.invoke()
            outs.append(np.array(it.get_output(0), copy=True))
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    @staticmethod
    def version() -> str:
        return tflm_version()

