"""The ``ort`` backend: ``.ort`` files for ONNX Runtime Mobile, made from the run's ``.onnx`` student files.

One ``<model>_<precision>.ort`` per ``.onnx`` file of the student, converted by onnxruntime's own tool
(:func:`edgekd.export.onnx_app.convert_to_ort`), with one ``required_operators.config`` for a reduced build
that travels with them; each is verified in onnxruntime like its ``.onnx`` and must score exactly what it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.errors import ExportError
from edgekd.export.backends import Derived, ExportBackend, register_backend
from edgekd.export.common import tool_versions
from edgekd.export.onnx import describe_onnx
from edgekd.export.onnx_app import ORT_CONFIG, convert_to_ort


ROUTE_ORT = "onnxruntime-ort"


class OrtBackend(ExportBackend):
    """``.ort`` files (ONNX Runtime Mobile), one per ``.onnx`` file of the student, with one
    ``required_operators.config`` for a reduced build; verified in onnxruntime like their ``.onnx``."""

    name = "ort"
    suffix = ".ort"
    source = ("onnx", None)
    teacher = False
    tools = ("onnxruntime",)
    runtime = "onnxruntime"

    def build(self, ctx: Any, target: Any) -> None:
        """Convert every source file in one call, so the operator config covers them all, then record each."""
        sources = ctx.source_entries(self, target)
        if not sources:
            return
        rd = ctx.session.rd
        try:
            convert_to_ort([rd / e["file"] for e in sources], rd.path)
        except ExportError as e:
            ctx.fail(".ort files", e)
            return
        for entry in sources:
            ctx.derive(self, target, entry)

    def derive(self, source_path: Path, source_entry: dict[str, Any], path: Path, ctx: Any) -> Derived:
        from edgekd.run_dir import sha256_file

        if not path.is_file():  # derived on its own (not through build): convert just this file
            convert_to_ort([source_path], path.parent)
        entry = {**source_entry, "file": path.name, "backend": self.name, "format": self.name,
                 "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "route": ROUTE_ORT,
                 "source": source_entry["file"], "ort_config": ORT_CONFIG,
                 "tool_versions": tool_versions(self.tools)}
        entry.pop("verified", None)
        return Derived(entry, companions=[ORT_CONFIG])

    def io_spec(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return describe_onnx(path)


register_backend(OrtBackend())
