"""LiteRT (the TFLite interpreter) as a runtime for ``.tflite`` files.

The interpreter comes from ``ai_edge_litert``, else ``tflite_runtime`` (what a Raspberry Pi gets from pip),
else TensorFlow.
"""

from __future__ import annotations

import numpy as np

from edgekd.errors import ExportError
from edgekd.runtimes.base import Runtime, installed, register_runtime

_MODULES = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def interpreter_class():
    """``(Interpreter class, module name)`` of the first TFLite interpreter installed.

    Raises:
        ExportError: None is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter, "tensorflow"
    except ImportError as e:
        raise ExportError("no TFLite interpreter installed",
                          "pip install ai-edge-litert (or tflite-runtime on a device)") from e


@register_runtime
class LiteRTRuntime(Runtime):
    """A .tflite file in LiteRT's interpreter (``ai_edge_litert``, else ``tflite_runtime``, else TensorFlow)."""

    name = "litert"
    suffixes = (".tflite",)

    def _load(self) -> None:
        cls, self.module = interpreter_class()
        kwargs = {"num_threads": self.threads} if self.threads else {}
        try:
            self.interpreter = cls(model_path=str(self.path), **kwargs)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise ExportError(f"LiteRT cannot load {self.path.name}: {str(e).splitlines()[0][:200]}") from e
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._batch = int(self._in["shape"][0])
        sig = self._in.get("shape_signature")
        self._dynamic_batch = sig is not None and len(sig) > 0 and int(sig[0]) == -1

    def run(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if x.shape[0] > 1 and self._batch == 1 and not self._dynamic_batch:
            # A graph exported at a fixed batch cannot be resized (XNNPACK refuses, and a reshape baked into
            # the graph would mix samples): run it one sample at a time, as an app would.
            return np.concatenate([self.run(x[i:i + 1]) for i in range(x.shape[0])])
        if x.shape[0] != self._batch:
            it.resize_tensor_input(self._in["index"], list(x.shape), strict=False)
            it.allocate_tensors()
            self._batch = x.shape[0]
            self._out = it.get_output_details()[0]
        it.set_tensor(self._in["index"], x)
        it.invoke()
        return it.get_tensor(self._out["index"]).copy()

    @classmethod
    def available(cls) -> bool:
        return installed(*_MODULES)

    @classmethod
    def import_libraries(cls) -> None:
        interpreter_class()

    @staticmethod
    def version() -> str:
        _, module = interpreter_class()
        if module == "ai_edge_litert":
            from importlib.metadata import version

            return f"ai-edge-litert {version('ai-edge-litert')}"
        return module
