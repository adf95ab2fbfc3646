"""ONNX Runtime (CPU execution provider) as a runtime for ``.onnx`` files."""

from __future__ import annotations

import numpy as np

from edgekd.errors import ExportError
from edgekd.runtimes.base import Runtime, installed, register_runtime


@register_runtime
class OnnxRuntime(Runtime):
    """An ONNX file in onnxruntime's CPU execution provider."""

    name = "onnxruntime"
    suffixes = (".onnx",)

    def _load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {self.path.name}: {str(e).splitlines()[0][:200]}") from e
        self.input_name = self.session.get_inputs()[0].name
        first = self.session.get_inputs()[0].shape[0] if self.session.get_inputs()[0].shape else None
        self._fixed_batch_1 = first == 1

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] > 1 and self._fixed_batch_1:
            # Exported with a static batch of 1: run one sample at a time rather than fail.
            return np.concatenate([self.run(x[i:i + 1]) for i in range(x.shape[0])])
        return self.session.run(None, {self.input_name: x})[0]

    @classmethod
    def available(cls) -> bool:
        return installed("onnxruntime")

    @classmethod
    def import_libraries(cls) -> None:
        import onnxruntime  # noqa: F401

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__
