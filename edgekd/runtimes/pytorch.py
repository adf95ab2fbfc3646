"""PyTorch as a runtime: an edgekd checkpoint (``.pt``) rebuilt with :func:`edgekd.models.load_model`."""

from __future__ import annotations

import numpy as np

from edgekd.runtimes.base import Runtime, register_runtime


@register_runtime
class TorchRuntime(Runtime):
    """A PyTorch model: an edgekd checkpoint (teacher, baseline, student or pruned) rebuilt from its spec."""

    name = "torch"
    suffixes = (".pt",)

    def _load(self) -> None:
        import torch

        from edgekd.models import load_model

        loader = self.entry.get("loader")
        # A caller may bring its own rebuild function (e.g. for a model edgekd cannot build).
        self.model = loader(self.path) if loader is not None else load_model(self.path)
        self.model.eval()
        self._torch = torch

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    @classmethod
    def import_libraries(cls) -> None:
        import torch  # noqa: F401

        import edgekd.models  # noqa: F401

    @staticmethod
    def version() -> str:
        import torch

        return torch.__version__
