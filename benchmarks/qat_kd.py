"""PTQ vs quantization-aware distillation (QAT-KD): int8 accuracy of the default student and of MobileNetV2.

For every model and seed: the student is distilled in float (KD from a fixed teacher, teacher logits cached),
then quantized two ways with the same quantizer (litert-torch PT2E, per-channel weights, the int8 TFLite
route's configuration) and the same calibration samples:

* PTQ: calibrate, convert;
* QAT-KD: calibrate, then fine-tune with fake quantization against the teacher's logits, convert.

Accuracies are of the converted int8 graph (explicit quantize/dequantize nodes) on the test split; that graph is
what the TFLite and ONNX files are written from, and tests/test_qat.py checks the files agree with it (>= 99%
top-1). QAT time is the fine-tuning alone (PTQ's calibration is common to both). MobileNetV2 sees the 28 px
digits bilinearly resized inside the model (``--size``).

Writes ``benchmarks/results/qat_kd.{json,md}``.

Usage: OMP_NUM_THREADS=1 python benchmarks/qat_kd.py --teacher-run exported/mnist_s0 [--seeds 0 1 2]
       [--float-epochs 8] [--qat-epochs 2] [--limit 2000] [--mbv2-width 0.35] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd import provenance

RESULTS = Path(__file__).parent / "results"


class Resized(nn.Module):
    """Resize the input to ``size`` px before the model (MobileNetV2 at 32-96 px on 28 px digits)."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        return self.model(nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    from edgekd.quant.qat import top1

    return float((top1(model, x) == y).mean())


def ptq(student: nn.Module, calib: torch.Tensor) -> nn.Module:
    """PT2E PTQ with the same quantizer as QAT (observers instead of fake quantization)."""
    import warnings

    from edgekd.quant import int8_quantizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        graph = torch.export.export(student.eval(), (calib[:2],),
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},)).module()
        prepared = prepare_pt2e(graph, int8_quantizer(qat=False))
        move_exported_model_to_eval(prepared)
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                prepared(calib[i:i + 64])
        converted = convert_pt2e(prepared, fold_quantize=False)
    from edgekd.quant.qat import _stays_in_inference_form
    import types

    converted.eval = types.MethodType(_stays_in_inference_form, converted)
    return converted


def one(name, make_student, data, teacher, seed, args, work) -> dict:
    from edgekd import losses
    from edgekd.training import FitConfig, fit
    from edgekd.quant import calibrate, convert_qat, finetune_qat, prepare_qat
    from edgekd.recipe import TrainConfig

    x = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    y = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    kd = losses.build("kd", temperature=4.0, alpha=1.0)
    torch.manual_seed(seed)
    student = make_student()
    t0 = time.perf_counter()
    fit(student, data, kd, FitConfig(role="float", train=TrainConfig(epochs=args.float_epochs, lr=0.01,
                                                                     scheduler="onecycle"),
                                     seed=seed, state_path=work / f"float-{seed}.pt", quiet=True), teacher=teacher)
    float_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data.train), size=min(256, len(data.train)), replace=False))
    calib = torch.stack([data.train[int(i)][0] for i in idx])
    row = {"model": name, "seed": seed, "float": accuracy(student, x, y), "float_seconds": round(float_s, 1)}
    row["ptq_int8"] = accuracy(ptq(student, calib), x, y)
    qat = prepare_qat(student, calib[:2])
    calibrate(qat, [calib[i:i + 64] for i in range(0, len(calib), 64)])
    t0 = time.perf_counter()
    finetune_qat(qat, data, TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, scheduler="cosine"), kd,
                 seed=seed, state_path=work / f"{name}-{seed}-qat.pt", teacher=teacher)
    row["qat_seconds"] = round(time.perf_counter() - t0, 1)
    row["qat_fake_quant"] = accuracy(qat, x, y)
    row["qat_int8"] = accuracy(convert_qat(qat), x, y)
    print(json.dumps(row), flush=True)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        s = {"model": name, "seeds": [r["seed"] for r in rs]}
        for k in ("float", "ptq_int8", "qat_int8", "float_seconds", "qat_seconds"):
            v = [r[k] for r in rs]
            s[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
        s["qat_minus_float"] = s["qat_int8"]["mean"] - s["float"]["mean"]
        s["qat_minus_ptq"] = s["qat_int8"]["mean"] - s["ptq_int8"]["mean"]
        out.append(s)
    return out


def markdown(summary: list[dict], setups: dict) -> str:
    lines = ["# PTQ vs QAT-KD (int8, litert-torch PT2E quantizer)\n",
             "| model | seeds | float | PTQ int8 | QAT-KD int8 | QAT − float | QAT − PTQ | float train s | QAT adds s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        f = lambda k: f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}"  # noqa: E731
        lines.append(f"| {s['model']} | {len(s['seeds'])} | {f('float')} | {f('ptq_int8')} | {f('qat_int8')} | "
                     f"{100 * s['qat_minus_float']:+.2f} pt | {100 * s['qat_minus_ptq']:+.2f} pt | "
                     f"{s['float_seconds']['mean']:.0f} | {s['qat_seconds']['mean']:.0f} |")
    for model, meta in setups.items():
        lines.append(f"\n{model}: {meta['setup']}. Machine: {meta['machine']}; load average before / after: "
                     f"{meta['load_before']} / {meta['load_after']}.")
    # Models may come from separate invocations: one provenance section per command.
    blocks = {m["provenance"]["command"]: m["provenance"] for m in setups.values() if m.get("provenance")}
    lines += ["\n" + provenance.markdown(b) for b in blocks.values()]
    return "\n".join(lines) + "\n"


def main() -> None:
    from edgekd.data import load_data
    from edgekd.models import load_model
    from edgekd.models import create_model
    from edgekd.recipe import read_yaml, validate_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-run", required=True, help="a finished distill run of the default recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--float-epochs", type=int, default=8)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=2000, help="samples of the dataset used (affordable on 2 cores)")
    ap.add_argument("--mbv2-width", type=float, default=0.35)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=["student", "mobilenetv2"])
    ap.add_argument("--tag", default="", help="appended to the model names (a second setting of the same model)")
    args = ap.parse_args()
    prov = provenance.start()
    run = Path(args.teacher_run)
    recipe = validate_recipe(read_yaml(run / "recipe.yaml"), source=str(run / "recipe.yaml"))
    data = load_data(recipe.data.model_copy(update={"limit": args.limit}), recipe.seed)
    teacher = load_model(run / "teacher.pt").eval()
    shape, n = tuple(data.input_shape), data.num_classes
    makers = {"student": lambda: create_model(recipe.student.model, shape, n, **recipe.student.kwargs),
              "mobilenetv2": lambda: Resized(create_model("mobilenetv2", (shape[0], args.size, args.size), n,
                                                          width_mult=args.mbv2_width), args.size)}
    names = {"student": f"{recipe.student.model} {recipe.student.kwargs}",
             "mobilenetv2": f"mobilenetv2 w{args.mbv2_width} @{args.size}px"}
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qat-kd-") as tmp:
        for key in args.models:
            for seed in args.seeds:
                rows.append(one(names[key] + args.tag, makers[key], data, teacher, seed, args, Path(tmp)))
    meta = {"setup": (f"{recipe.data.dataset}, {args.limit} samples ({len(data.train)} train / {len(data.test)} test), "
                      f"teacher {run / 'teacher.pt'}; float KD {args.float_epochs} epochs, QAT-KD {args.qat_epochs} "
                      f"epochs at lr {args.qat_lr} (cosine), KD T=4 alpha=1, 256 calibration samples"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}",
            "load_before": [round(v, 1) for v in load_before], "load_after": [round(v, 1) for v in os.getloadavg()],
            "args": vars(args), "provenance": prov.finish()}
    RESULTS.mkdir(exist_ok=True)
    # Models are measured in separate invocations on a shared machine: keep the other models' rows and setups.
    path = RESULTS / "qat_kd.json"
    old = json.loads(path.read_text()) if path.is_file() else {"rows": [], "setups": {}}
    done = {r["model"] for r in rows}
    rows = [r for r in old["rows"] if r["model"] not in done] + rows
    setups = {**old.get("setups", {}), **{m: meta for m in done}}
    summary = summarize(rows)
    path.write_text(json.dumps({"setups": setups, "rows": rows, "summary": summary,
                                "provenance": meta["provenance"]}, indent=2))
    text = markdown(summary, setups)
    (RESULTS / "qat_kd.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
