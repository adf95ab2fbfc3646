#!/usr/bin/env bash
# CI step: every .tflite model of a run must give exactly the same accuracy on an emulated Raspberry Pi
# (Debian bookworm arm64 + tflite-runtime 2.14 under qemu-user) as on this x86 host with the same runtime
# release (tflite-runtime 2.14's x86_64 wheel in a cached venv with numpy<2). Same release, other CPU: float
# files are compared with the default kernels, int8 and dynamic-range files with TFLite's built-in kernels
# (bench.py's accuracy_builtin), whose fixed-point arithmetic does not depend on the CPU; their default
# (XNNPACK) figures are printed too, not gated. The host's ai-edge-litert (what `edgekd validate` uses, a
# newer release) is printed for information: its int8 kernels round differently from 2.14's and may flip a sample.
#
#   .ci/emulated_pi.sh RUN_DIR
#
# Both sides measure the first ${EDGEKD_PI_MAX_EVAL:-2000} eval samples (0 = all): an emulated inference
# of a small CNN takes milliseconds, so the whole MNIST test set would cost minutes per model, and equal
# accuracy on the same 2000 samples is the same check.
# Installs qemu-user-static and debootstrap with apt-get when they are missing, makes one bundle of the
# run, runs bench.py on it here and under emulation, prints a table and exits 1 on any mismatch or on a
# .tflite model that either side could not run. The arm64 userland is cached (see emulate_pi.sh), so
# only the first run on a machine builds it (about half a minute).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${EDGEKD_PYTHON:-$REPO/.venv/bin/python}"

die() { echo "emulated_pi.sh: error: $*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: .ci/emulated_pi.sh RUN_DIR"
RUN_DIR="$1"
MAX_EVAL="${EDGEKD_PI_MAX_EVAL:-2000}"
[[ "$MAX_EVAL" =~ ^[0-9]+$ ]] || die "EDGEKD_PI_MAX_EVAL must be a whole number"
LIMIT=()
[ "$MAX_EVAL" -eq 0 ] || LIMIT=(--max-eval "$MAX_EVAL")
[ -f "$RUN_DIR/metadata.json" ] || die "$RUN_DIR/metadata.json not found"
[ -x "$PY" ] || die "$PY not found: run 'make setup' first (or set EDGEKD_PYTHON)"

if ! command -v qemu-aarch64-static >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  echo "emulated_pi.sh: installing qemu-user-static and debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq qemu-user-static debootstrap >/dev/null
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
"$PY" -m edgekd.bundle "$RUN_DIR" "$WORK/bundle" >/dev/null

# The host references: the same bundle, the same bench.py, TFLite models only; tflite-runtime 2.14 (the Pi's
# release) from a cached venv, and the project's ai-edge-litert.
HOST_VENV="${EDGEKD_HOST_TFLITE_VENV:-${HOME:-/root}/.cache/edgekd/host-tflite-runtime-2.14}"
if ! "$HOST_VENV/bin/python" -c "import tflite_runtime" >/dev/null 2>&1; then
  echo "emulated_pi.sh: making $HOST_VENV (numpy<2, tflite-runtime==2.14.0)"
  rm -rf "$HOST_VENV"
  "$PY" -m venv "$HOST_VENV"
  "$HOST_VENV/bin/python" -m pip install -q "numpy<2" tflite-runtime==2.14.0 >/dev/null
fi
"$HOST_VENV/bin/python" "$WORK/bundle/bench.py" "$WORK/bundle" --runtime tflite --runs 20 --warmup 2 \
  "${LIMIT[@]}" --json "$WORK/host.json" >/dev/null
"$PY" "$WORK/bundle/bench.py" "$WORK/bundle" --runtime tflite --runs 20 --warmup 2 "${LIMIT[@]}" \
  --json "$WORK/litert.json" >/dev/null
t_host=$SECONDS
"$REPO/device_tests/emulate_pi.sh" --runs 20 --warmup 2 "${LIMIT[@]}" --json "$WORK/pi.json" "$WORK/bundle" \
  >/dev/null
t_pi=$SECONDS

status=0
"$PY" - "$WORK/bundle/metadata.json" "$WORK/host.json" "$WORK/pi.json" "$WORK/litert.json" <<'EOF' || status=$?
import json
import sys

meta, host, pi, litert = (json.load(open(p)) for p in sys.argv[1:5])
tflite = [m["file"] for m in meta["models"] if m["file"].endswith(".tflite")]
by_file = lambda report: {r["file"]: r for r in report["results"]}
skipped = lambda report: {s.get("file"): s["reason"] for s in report["skipped"]}
h, p, lr, hs, ps = by_file(host), by_file(pi), by_file(litert), skipped(host), skipped(pi)
fmt = lambda a: "-" if a is None else f"{a:.6f}"
rt = lambda report: report["device"]["runtime"] + " " + report["device"]["runtime_version"]
print(f"host x86_64: {rt(host)}; emulated Pi aarch64: {rt(pi)}; for information: host {rt(litert)}")
print(f"{'model file':<30} {'host':>10} {'emulated Pi':>12}  {'compared on':<17} {'verdict':<9} "
      f"{'ai-edge-litert':>14}")
bad = notes = 0
for f in tflite:
    hr, pr, lrow = h.get(f), p.get(f), lr.get(f) or {}
    if hr is None or pr is None:
        print(f"{f:<30} {'-':>10} {'-':>12}  {'-':<17} NOT RUN: " + (hs.get(f) or ps.get(f) or "missing"))
        bad += 1
        continue
    # Integer files: gate on TFLite's built-in kernels (fixed-point, CPU-independent within a release); the
    # default XNNPACK figures of the same release are shown on a second line, not gated.
    key = "accuracy_builtin" if "accuracy_builtin" in hr and "accuracy_builtin" in pr else "accuracy"
    same = hr[key] == pr[key]
    bad += not same
    print(f"{f:<30} {fmt(hr[key]):>10} {fmt(pr[key]):>12}  {'built-in kernels' if key != 'accuracy' else 'default kernels':<17} "
          f"{'same' if same else 'MISMATCH':<9} {fmt(lrow.get(key)):>14}")
    if key != "accuracy":
        differ = hr["accuracy"] != pr["accuracy"]
        notes += differ
        print(f"{'':<30} {fmt(hr['accuracy']):>10} {fmt(pr['accuracy']):>12}  {'default kernels':<17} "
              f"{'differ' if differ else 'same':<9} {fmt(lrow.get('accuracy')):>14}")
if not tflite:
    print("no .tflite model in the run")
    bad += 1
print(f"{len(tflite) - bad} of {len(tflite)} .tflite files give exactly the host's accuracy on the emulated Pi"
      + (f"; {notes} differ with the default XNNPACK kernels (not gated)" if notes else ""))
sys.exit(1 if bad else 0)
EOF
echo "emulated_pi.sh: host run $((t_host - start)) s, emulated run $((t_pi - t_host)) s (includes building the userland if it was not cached)"
exit $status
