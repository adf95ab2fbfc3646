#!/usr/bin/env bash
# CI step: every .tflite model of a run must give exactly the same accuracy on an emulated Raspberry Pi
# (Debian bookworm arm64 + tflite-runtime 2.14 under qemu-user) as on this host (ai_edge_litert).
# int8 and dynamic-range files are compared with TFLite's built-in kernels (bench.py's accuracy_builtin):
# their integer arithmetic is the same on every CPU, while the default XNNPACK kernels requantize with
# CPU-specific rounding (x86 and ARM can disagree on an odd sample); those figures are printed, not gated.
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

# The host reference: the same bundle, the same bench.py, TFLite models only.
"$PY" "$WORK/bundle/bench.py" "$WORK/bundle" --runtime tflite --runs 20 --warmup 2 "${LIMIT[@]}" \
  --json "$WORK/host.json" >/dev/null
t_host=$SECONDS
"$REPO/device_tests/emulate_pi.sh" --runs 20 --warmup 2 "${LIMIT[@]}" --json "$WORK/pi.json" "$WORK/bundle" \
  >/dev/null
t_pi=$SECONDS

status=0
"$PY" - "$WORK/bundle/metadata.json" "$WORK/host.json" "$WORK/pi.json" <<'EOF' || status=$?
import json
import sys

meta, host, pi = (json.load(open(p)) for p in sys.argv[1:4])
tflite = [m["file"] for m in meta["models"] if m["file"].endswith(".tflite")]
by_file = lambda report: {r["file"]: r for r in report["results"]}
skipped = lambda report: {s.get("file"): s["reason"] for s in report["skipped"]}
h, p, hs, ps = by_file(host), by_file(pi), skipped(host), skipped(pi)
fmt = lambda a: "-" if a is None else f"{a:.6f}"
print(f"{'model file':<30} {'host ' + host['device']['runtime']:>22} {'emulated Pi ' + pi['device']['runtime']:>28}"
      "  compared on        verdict")
bad = notes = 0
for f in tflite:
    hr, pr = h.get(f), p.get(f)
    if hr is None or pr is None:
        print(f"{f:<30} {'-':>22} {'-':>28}  -                  NOT RUN: "
              + (hs.get(f) or ps.get(f) or "missing from the report"))
        bad += 1
        continue
    # Integer models: gate on TFLite's built-in kernels, whose int8 arithmetic is specified bit for bit
    # on every CPU; the default (XNNPACK) kernels round requantization per CPU family and are shown too.
    key = "accuracy_builtin" if "accuracy_builtin" in hr and "accuracy_builtin" in pr else "accuracy"
    same = hr[key] == pr[key]
    bad += not same
    print(f"{f:<30} {fmt(hr[key]):>22} {fmt(pr[key]):>28}  "
          f"{'built-in kernels' if key != 'accuracy' else 'default kernels':<18} {'same' if same else 'MISMATCH'}")
    if key != "accuracy":
        note = "same" if hr["accuracy"] == pr["accuracy"] else "differ (XNNPACK rounding; not gated)"
        notes += hr["accuracy"] != pr["accuracy"]
        print(f"{'':<30} {fmt(hr['accuracy']):>22} {fmt(pr['accuracy']):>28}  {'default kernels':<18} {note}")
if not tflite:
    print("no .tflite model in the run")
    bad += 1
print(f"{len(tflite) - bad} of {len(tflite)} .tflite files give exactly the host's accuracy on the emulated Pi"
      + (f"; {notes} differ with the default XNNPACK kernels" if notes else ""))
sys.exit(1 if bad else 0)
EOF
echo "emulated_pi.sh: host run $((t_host - start)) s, emulated run $((t_pi - t_host)) s (includes building the userland if it was not cached)"
exit $status
