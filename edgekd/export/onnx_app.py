"""ONNX files for apps: self-describing ``metadata_props``, no unused opset imports, ``.ort`` for ONNX Runtime Mobile.

* ``metadata_props`` carry what an app needs to feed the file without edgekd: labels, input name and layout,
  the normalization in pixel units (0..255) and in unit scale (0..1), and whether the output is logits or
  probabilities. ONNX Runtime exposes them as ``session.get_modelmeta().custom_metadata_map``.
* ONNX Runtime's quantizer declares a dozen operator domains (``com.microsoft.nchwc``, ``ai.onnx.training``,
  ...) the graph never uses; strict loaders and reduced (mobile) builds may refuse unknown domains, so the
  imports no node uses are dropped.
* ``.ort`` files are what ONNX Runtime Mobile (the ``onnxruntime-android`` / ``onnxruntime-objc`` packages and
  reduced builds) loads; ``required_operators.config`` lists the operators for a reduced build. Both come from
  ``onnxruntime.tools.convert_onnx_models_to_ort``, the conversion the ONNX Runtime docs prescribe.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgekd.errors import ExportError
from edgekd.export.common import PIXEL_SCALE
from edgekd.run_dir import atomic_path

PROP_PREFIX = "edgekd."
ORT_CONFIG = "required_operators.config"


def metadata_props(*, labels: Sequence[str], input_name: str, layout: str, normalization: dict[str, Any],
                   output: str, version: str, run: str, image: bool) -> dict[str, str]:
    """The ``metadata_props`` of an exported ONNX file (all values are strings, as ONNX requires).

    Args:
        labels: Class names in output order.
        input_name: The graph input's name.
        layout: ``NCHW`` or ``NF``.
        normalization: ``{"mean", "std"}`` the file expects applied to inputs in unit scale (0..1 pixels).
        output: ``logits`` or ``probabilities``.
        version: edgekd's version.
        run: The run name.
        image: Whether inputs are images (then the pixel-unit normalization is written too).
    """
    mean = [float(v) for v in normalization.get("mean", [])]
    std = [float(v) for v in normalization.get("std", [])]
    props = {
        "labels": json.dumps(list(labels)),
        "input_name": input_name,
        "input_layout": layout,
        "output": output,
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "edgekd_version": version,
        "edgekd_run": run,
    }
    if image:
        props.update({
            "pixel_scale": f"{PIXEL_SCALE:g}",
            "mean_pixels": json.dumps([m * PIXEL_SCALE for m in mean]),
            "std_pixels": json.dumps([s * PIXEL_SCALE for s in std]),
            "preprocessing": "x = (pixel - mean_pixels) / std_pixels per channel, NCHW, RGB order",
        })
    return props


def used_domains(model) -> set[str]:
    """Operator domains used by any node of the graph, its subgraphs or its local functions."""
    domains: set[str] = set()

    def walk(graph) -> None:
        for node in graph.node:
            domains.add(node.domain or "")
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        domains.add(fn.domain or "")
        for node in fn.node:
            domains.add(node.domain or "")
    return domains


def tidy(model, props: dict[str, str]):
    """Drop opset imports no node uses (keeping the default domain) and set ``metadata_props``."""
    import onnx

    used = used_domains(model) | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update(props)
    del model.metadata_props[:]
    for key in sorted(existing):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=existing[key]))
    return model


def finish_onnx_file(path: Path, props: dict[str, str]) -> None:
    """Tidy a written ``.onnx`` file in place (atomically) and check it again.

    Raises:
        ExportError: The tidied model fails ONNX's checker.
    """
    import onnx

    model = onnx.load(str(path))
    tidy(model, props)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{Path(path).name} fails onnx.checker after adding metadata: {str(e)[:200]}") from e
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def convert_to_ort(onnx_paths: Sequence[Path], out_dir: Path) -> tuple[list[Path], Path]:
    """Convert ``.onnx`` files to ``.ort`` beside them, with one ``required_operators.config`` for all.

    The conversion targets ARM (ONNX Runtime Mobile's devices): graph optimizations that only x86 kernels
    have (NCHWc) are left out, and int8 QDQ pairs are kept for ARM's int8 kernels.

    Returns:
        The ``.ort`` paths (in the order of ``onnx_paths``) and the config path.

    Raises:
        ExportError: onnxruntime's converter failed; the message names the file when it can.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from edgekd.export.common import quiet

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as work:
        src = Path(work) / "onnx"
        dst = Path(work) / "ort"
        src.mkdir()
        for p in onnx_paths:
            shutil.copy2(p, src / Path(p).name)
        try:
            with quiet():
                convert_onnx_models_to_ort(src, output_dir=dst, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm")
        except Exception as e:
            raise ExportError(f".ort conversion failed in onnxruntime: {type(e).__name__}: {str(e)[:200]}") from e
        outs = []
        for p in onnx_paths:
            made = dst / (Path(p).stem + ".ort")
            if not made.is_file():
                raise ExportError(f".ort conversion of {Path(p).name} wrote no file")
            target = out_dir / made.name
            with atomic_path(target) as tmp:
                shutil.copyfile(made, tmp)
            outs.append(target)
        config = next(dst.glob("required_operators*.config"), None)
        if config is None:
            raise ExportError(".ort conversion wrote no required_operators.config")
        config_path = out_dir / ORT_CONFIG
        with atomic_path(config_path) as tmp:
            shutil.copyfile(config, tmp)
    return outs, config_path


def run_onnx_session(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs of an ``.onnx`` or ``.ort`` file on prepared inputs (one session, CPU provider)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def custom_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` as an app reads them from ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)

