"""MediaPipe Tasks' ``ImageClassifier`` as a runtime: app-profile ``.tflite`` files run as an app runs them.

The runtime hands MediaPipe RGB uint8 bitmaps (raw inputs scaled to 0..255 and rounded, gray replicated to
R = G = B) and reads the score of every class back, so validate and bench measure the client itself, not
just the interpreter inside it. Only app-profile files (``"profile": "app"`` in metadata.json) run here:
MediaPipe refuses the research files (NCHW or 1-channel input, no metadata). Optional dependency
(``pip install edgekd[app]``).
"""

from __future__ import annotations

import numpy as np

from edgekd.errors import ExportError
from typing import Any

from edgekd.runtimes.base import Runtime, installed, prepare_input, register_runtime


@register_runtime
class MediaPipeRuntime(Runtime):
    """An app-profile ``.tflite`` file in MediaPipe's ``ImageClassifier`` (scores of every class)."""

    name = "mediapipe"
    suffixes = (".tflite",)

    @classmethod
    def available(cls) -> bool:
        return installed("mediapipe")

    @classmethod
    def accepts(cls, entry: dict[str, Any] | None) -> bool:
        return bool(entry) and entry.get("profile") == "app"

    def _load(self) -> None:
        if self.entry.get("profile") != "app":
            raise ExportError(f"{self.path.name} is not an app-profile file: MediaPipe's ImageClassifier needs "
                              "RGB pixel input and metadata", "run the *_app_*.tflite files in mediapipe")
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        self.classes = int(self.entry["output"]["shape"][-1])
        options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(self.path)),
                                                max_results=-1)
        try:
            self.classifier = vision.ImageClassifier.create_from_options(options)
        except Exception as e:  # MediaPipe raises with the C++ status text
            raise ExportError(f"MediaPipe cannot load {self.path.name}: {str(e).strip().splitlines()[0][:200]}") from e

    def prepare(self, x_raw: np.ndarray) -> np.ndarray:
        """Raw inputs → the uint8 RGB bitmaps an app hands MediaPipe (N, H, W, 3)."""
        spec = {**self.entry, "input": {**self.entry["input"], "dtype": "float32", "quantization": None}}
        return np.clip(np.round(prepare_input(x_raw, spec)), 0, 255).astype(np.uint8)

    def run(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.classes), np.float32)
        for i in range(len(x)):
            image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(x[i]))
            for c in self.classifier.classify(image).classifications[0].categories:
                out[i, c.index] = c.score
        return out

    def close(self) -> None:
        """Release MediaPipe's graph (it otherwise lingers until interpreter exit)."""
        classifier, self.classifier = getattr(self, "classifier", None), None
        if classifier is not None:
            classifier.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit MediaPipe's C bindings may already be gone
            pass

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return f"mediapipe {version('mediapipe')}"
