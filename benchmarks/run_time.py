"""How long does `edgekd run RECIPE` take end to end? Times the whole command and each stage of it.

Runs ``edgekd run RECIPE`` in a child process (a new run directory under ``--work``), samples the machine's load
average every ``--every`` seconds while it runs (other work on the machine slows every stage), then reads the
stage times from the run's ``manifest.json``. Writes ``run_time.{json,md}`` to ``--out``: the wall-clock time of
the command, the seconds of each stage (and of the teacher, baseline and student inside distill), the load
samples, and the provenance block.

Usage: python benchmarks/run_time.py [--recipe recipes/fashion_mnist.yaml] [--work DIR] [--out DIR]
       [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from edgekd import provenance
from edgekd.run_dir import TIME_FORMAT

RESULTS = Path(__file__).parent / "results" / "fashion_mnist"
TRAINED = ("teacher", "baseline", "student")


def sample_load(stop: threading.Event, every: float, out: list[float]) -> None:
    """Append the 1-minute load average every ``every`` seconds until ``stop`` is set."""
    while True:
        out.append(round(os.getloadavg()[0], 2))
        if stop.wait(every):
            return


def stage_seconds(manifest: dict) -> dict[str, float]:
    """Seconds of each finished stage (its own figure, else from its start and finish times, to the second);
    for the models trained inside distill, their training seconds."""
    out = {}
    for name, st in manifest.get("stages", {}).items():
        if name in TRAINED:
            secs = (st.get("info") or {}).get("train_seconds")
            if secs:  # a teacher loaded from a checkpoint trained for 0 s
                out[f"distill: {name}"] = float(secs)
        elif st.get("seconds") is not None:
            out[name] = float(st["seconds"])
        elif st.get("started") and st.get("finished"):
            start, end = (datetime.strptime(st[k], TIME_FORMAT) for k in ("started", "finished"))
            out[name] = (end - start).total_seconds()
    return out


def write_md(out: Path, res: dict) -> None:
    m = res["minutes"]
    lines = [f"# `edgekd run {res['recipe']}`: time end to end", "",
             f"{m:.1f} minutes wall clock for the whole command ({res['cores']} cores, {res['threads']} torch "
             f"threads per process); load average over the run (1 min, sampled every {res['every_s']:.0f} s): "
             f"median {res['load']['median']:.2f}, max {res['load']['max']:.2f}.", "",
             "| stage | minutes |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in res["stages"].items()]
    lines += ["", "Stages add up to less than the wall clock: the command also starts Python, loads the data and "
              "writes the run directory. `distill` includes the three models' training (the scratch baseline beside "
              "the KD student when `distill.parallel_baseline` is on) and their test evaluation.", "",
              provenance.markdown(res["provenance"])]
    (out / "run_time.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/fashion_mnist.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", default=None, help="parent of the run directory (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--every", type=float, default=30.0, help="seconds between load samples")
    args = ap.parse_args()

    import torch  # only for the thread count the run's processes get by default

    prov = provenance.start(threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        name = f"run-time-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [sys.executable, "-m", "edgekd", "run", args.recipe, "--out", str(work), "--name", name]
        for o in args.overrides:
            cmd += ["--set", o]
        loads: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_load, args=(stop, args.every, loads), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if rc != 0:
            sys.exit(f"error: `edgekd run` exited with {rc}; no results written")
        manifest = json.loads((work / name / "manifest.json").read_text())
    res = {"recipe": provenance.repo_path(args.recipe), "overrides": args.overrides, "seconds": round(wall, 1),
           "minutes": round(wall / 60, 2), "stages": stage_seconds(manifest), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "every_s": args.every,
           "load": {"samples": loads, "median": statistics.median(loads), "max": max(loads)},
           "provenance": prov.finish()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_time.json").write_text(json.dumps(res, indent=2) + "\n")
    write_md(out, res)
    print(f"edgekd run {args.recipe}: {wall / 60:.1f} min (load median {res['load']['median']:.2f}, "
          f"max {res['load']['max']:.2f})")
    for k, v in res["stages"].items():
        print(f"  {k}: {v / 60:.1f} min")


if __name__ == "__main__":
    main()
