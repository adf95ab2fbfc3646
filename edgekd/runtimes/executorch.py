"""ExecuTorch (``executorch.runtime``) as a runtime for ``.pte`` files, and its per-operator timings.

The Python runtime wraps the same C++ runtime an Android (``org.pytorch.executorch.Module``) or iOS
(``ExecuTorch.framework``) app links, with the XNNPACK delegate registered: a ``.pte`` file lowered to XNNPACK
runs the same kernels here as on a phone's CPU. Files are exported at batch 1 (what an app runs), so a batch
runs one sample per ``execute``.

:func:`operator_timings` reads the delegate's per-operator events from an ETDump with the devtools'
``Inspector`` when the installed build has the event tracer (the PyPI wheels do); otherwise it says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import ExportError
from edgekd.runtimes.base import Runtime, installed, register_runtime

INSTALL_HINT = 'pip install "edgekd[executorch]"'
# ExecuTorch's ScalarType codes of the dtypes a classifier's input and output can have.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64"}


def executorch_runtime():
    """``executorch.runtime.Runtime.get()``, or an :class:`ExportError` saying how to install ExecuTorch."""
    try:
        from executorch.runtime import Runtime as ETRuntime
    except ImportError as e:
        raise ExportError("ExecuTorch is not installed, so .pte files cannot be run", INSTALL_HINT) from e
    return ETRuntime.get()


def _quiet_load(path: Path, **kwargs: Any):
    """Load a program; ExecuTorch's loader logs CPU probing on stderr, which is silenced."""
    from edgekd.runtimes.tflm import captured_stderr

    rt = executorch_runtime()
    with captured_stderr():
        return rt.load_program(Path(path), **kwargs)


def io_spec(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output of a ``.pte`` file's ``forward`` method as the runtime reports them."""
    try:
        meta = _quiet_load(path).load_method("forward").metadata
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ExecuTorch cannot load {Path(path).name}: {str(e).strip()[:200]}") from e

    def spec(info, name: str) -> dict[str, Any]:
        dtype = int(info.dtype())
        return {"name": name, "shape": [int(s) for s in info.sizes()],
                "dtype": _SCALAR_TYPES.get(dtype, f"scalar_type_{dtype}"), "quantization": None}

    return spec(meta.input_tensor_meta(0), "input"), spec(meta.output_tensor_meta(0), "logits")


@register_runtime
class ExecuTorchRuntime(Runtime):
    """A ``.pte`` program in ExecuTorch's runtime (XNNPACK delegate), one sample per ``execute``."""

    name = "executorch"
    suffixes = (".pte",)

    def _load(self) -> None:
        import torch

        from edgekd.runtimes.tflm import captured_stderr

        self._torch = torch
        if self.threads:
            # XNNPACK's thread pool is process-wide; bench measures each file in a fresh process.
            from executorch.extension.pybindings import portable_lib

            with captured_stderr():
                portable_lib._unsafe_reset_threadpool(int(self.threads))
        try:
            self.program = _quiet_load(self.path)
            with captured_stderr():
                self.method = self.program.load_method("forward")
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ExecuTorch cannot load {self.path.name}: {str(e).strip()[:200]}") from e
        self._batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if x.shape[0] != self._batch:
            return np.concatenate([self.run(x[i:i + self._batch]) for i in range(0, x.shape[0], self._batch)])
        out = self.method.execute((torch.from_numpy(np.ascontiguousarray(x)),))
        return out[0].numpy().copy()

    @classmethod
    def available(cls) -> bool:
        return installed("executorch")

    @classmethod
    def import_libraries(cls) -> None:
        executorch_runtime()

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return f"executorch {version('executorch')}"

    @classmethod
    def operator_profile(cls, path: str | os.PathLike, entry: dict[str, Any], x_raw: np.ndarray) -> dict[str, Any]:
        return operator_timings(path, entry, x_raw)


def operator_timings(path: str | os.PathLike, entry: dict[str, Any], x_raw: np.ndarray,
                     runs: int = 20) -> dict[str, Any]:
    """Per-operator times of a ``.pte`` file from ETDump, read with the devtools' ``Inspector``.

    Args:
        path: The ``.pte`` file.
        entry: Its metadata.json entry (input preparation).
        x_raw: Raw inputs; the first sample is run ``runs`` times.
        runs: Executions profiled (with the process's XNNPACK threads).

    Returns:
        ``{"available": True, "runs", "operators": [{"name", "delegate", "median_ms", "mean_ms"}...],
        "delegate_call_ms", "execute_ms"}`` (medians) in execution order, or ``{"available": False, "reason": ...}`` when the installed build
        has no event tracer.
    """
    import torch

    from edgekd.runtimes.base import prepare_input
    from edgekd.runtimes.tflm import captured_stderr

    x = torch.from_numpy(prepare_input(x_raw[:1], entry))
    try:
        from executorch.devtools import Inspector

        program = _quiet_load(Path(path), enable_etdump=True, debug_buffer_size=1 << 20)
        with captured_stderr():
            method = program.load_method("forward")
            for _ in range(runs):
                method.execute((x,))
        with tempfile.TemporaryDirectory(prefix="edgekd-etdump-") as work:
            etdump = os.path.join(work, "run.etdp")
            program.write_etdump_result_to_file(etdump, os.path.join(work, "debug.bin"))
            with captured_stderr():
                inspector = Inspector(etdump_path=etdump)
    except ImportError as e:
        return {"available": False, "reason": f"ExecuTorch devtools not installed ({e.name})"}
    except Exception as e:  # a build without the event tracer refuses enable_etdump or writes nothing
        return {"available": False, "reason": f"no ETDump from this ExecuTorch build ({type(e).__name__}: "
                                              f"{str(e).strip()[:120]})"}
    ops, totals = [], {}
    for block in inspector.event_blocks:
        for ev in block.events:
            if ev.perf_data is None:
                continue
            # Medians: on a shared CPU a run that waited for a core would dominate a mean.
            if ev.is_delegated_op:
                ops.append({"name": ev.name, "delegate": ev.delegate_backend_name or "XnnpackBackend",
                            "median_ms": float(ev.perf_data.p50), "mean_ms": float(ev.perf_data.avg)})
            else:
                totals[ev.name] = float(ev.perf_data.p50)
    return {"available": True, "runs": runs, "operators": ops,
            "delegate_call_ms": totals.get("DELEGATE_CALL"), "execute_ms": totals.get("Method::execute")}
