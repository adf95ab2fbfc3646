#!/usr/bin/env bash
# Time every .tflite model of a bundle (or run directory) on an Android phone with TensorFlow Lite's
# benchmark_model binary, and write the results in the same JSON shape as bench.py.
#
#   device_tests/android/run_android.sh [options] BUNDLE
#
# Options:
#   --benchmark-model PATH  the benchmark_model binary for the phone's ABI (default: $BENCHMARK_MODEL,
#                           else ./benchmark_model); see device_tests/README.md for where to get it
#   --serial SERIAL         which adb device (default: $ANDROID_SERIAL, or the only one connected)
#   --threads N             --num_threads for the CPU (default 4)
#   --runs N                timed runs, --num_runs (default 50)
#   --warmup N              warm-up runs, --warmup_runs (default 5)
#   --delegate NAME         cpu | xnnpack | gpu | nnapi; repeat to run several (default: xnnpack)
#   --cpu-mask HEX          pin with taskset, e.g. f0 for the big cores of a 4+4 phone (default: none)
#   --remote-dir DIR        working folder on the phone (default /data/local/tmp/edgekd)
#   --json OUT              the report (default ./android.json)
#
# benchmark_model feeds random inputs, so the report has latency only (accuracy is null); run bench.py on
# a Linux board, or under emulation (emulate_pi.sh), for accuracy.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "run_android.sh: error: $*" >&2; exit 2; }
usage() { sed -n '5,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

BINARY="${BENCHMARK_MODEL:-./benchmark_model}"
SERIAL="${ANDROID_SERIAL:-}"
THREADS=4 RUNS=50 WARMUP=5 CPU_MASK="" REMOTE=/data/local/tmp/edgekd OUT="$PWD/android.json"
DELEGATES=()
BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --benchmark-model) BINARY="${2:?}"; shift 2 ;;
    --serial) SERIAL="${2:?}"; shift 2 ;;
    --threads) THREADS="${2:?}"; shift 2 ;;
    --runs) RUNS="${2:?}"; shift 2 ;;
    --warmup) WARMUP="${2:?}"; shift 2 ;;
    --delegate) DELEGATES+=("${2:?}"); shift 2 ;;
    --cpu-mask) CPU_MASK="${2:?}"; shift 2 ;;
    --remote-dir) REMOTE="${2:?}"; shift 2 ;;
    --json) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$BUNDLE" ] || die "only one BUNDLE may be given"; BUNDLE="$1"; shift ;;
  esac
done
[ -n "$BUNDLE" ] || usage
[ ${#DELEGATES[@]} -gt 0 ] || DELEGATES=(xnnpack)
for n in "$THREADS" "$RUNS" "$WARMUP"; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "--threads, --runs and --warmup take whole numbers, got '$n'"
done
[[ -z "$CPU_MASK" || "$CPU_MASK" =~ ^[0-9a-fA-F]+$ ]] || die "--cpu-mask takes a hex mask like f0"
[ -f "$BUNDLE/metadata.json" ] || die "$BUNDLE/metadata.json not found: pass a bundle or run directory"
[ -f "$BINARY" ] || die "benchmark_model binary not found at $BINARY (see device_tests/README.md)"
command -v adb >/dev/null 2>&1 || die "adb not found on PATH (install Android platform-tools)"
command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"

delegate_flags() {
  case "$1" in
    cpu) echo "--use_xnnpack=false" ;;
    xnnpack) echo "--use_xnnpack=true" ;;
    gpu) echo "--use_gpu=true" ;;
    nnapi) echo "--use_nnapi=true" ;;
    *) die "unknown delegate '$1' (cpu, xnnpack, gpu or nnapi)" ;;
  esac
}
for d in "${DELEGATES[@]}"; do delegate_flags "$d" >/dev/null; done

ADB=(adb)
[ -z "$SERIAL" ] || ADB+=(-s "$SERIAL")
state="$("${ADB[@]}" get-state 2>/dev/null || true)"
[ "$state" = "device" ] || die "no Android device ready (adb get-state said '${state:-nothing}'): connect one and allow USB debugging"

# The .tflite files the bundle lists (the ONNX ones need another runtime).
mapfile -t MODELS < <(python3 -c '
import json, sys
for m in json.load(open(sys.argv[1]))["models"]:
    if str(m.get("file", "")).endswith(".tflite"):
        print(m["file"])' "$BUNDLE/metadata.json")
[ ${#MODELS[@]} -gt 0 ] || die "$BUNDLE/metadata.json lists no .tflite model"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Describe the phone: getprop keys plus the core count.
{
  for key in ro.product.manufacturer ro.product.model ro.product.cpu.abi ro.soc.manufacturer ro.soc.model \
             ro.hardware ro.board.platform ro.build.version.release ro.build.version.sdk; do
    printf '%s=%s\n' "$key" "$("${ADB[@]}" shell getprop "$key" 2>/dev/null | tr -d '\r')"
  done
  printf 'cores=%s\n' "$("${ADB[@]}" shell nproc 2>/dev/null | tr -d '\r')"
} >"$WORK/device.txt"

"${ADB[@]}" shell mkdir -p "$REMOTE" >/dev/null
"${ADB[@]}" push "$BINARY" "$REMOTE/benchmark_model" >/dev/null || die "adb push of benchmark_model failed"
"${ADB[@]}" shell chmod 755 "$REMOTE/benchmark_model" >/dev/null
for f in "${MODELS[@]}"; do
  [ -f "$BUNDLE/$f" ] || die "$BUNDLE/$f is listed in metadata.json but missing"
  "${ADB[@]}" push "$BUNDLE/$f" "$REMOTE/$(basename "$f")" >/dev/null || die "adb push of $f failed"
done

: >"$WORK/runs.tsv"
i=0
for f in "${MODELS[@]}"; do
  for d in "${DELEGATES[@]}"; do
    i=$((i + 1))
    log="$WORK/run$i.log"
    cmd="$REMOTE/benchmark_model --graph=$REMOTE/$(basename "$f") --num_threads=$THREADS"
    cmd+=" --num_runs=$RUNS --warmup_runs=$WARMUP $(delegate_flags "$d")"
    [ -z "$CPU_MASK" ] || cmd="taskset $CPU_MASK $cmd"
    echo "run_android.sh: $f [$d]" >&2
    # A failing model or delegate must not stop the others: its output is kept and reported as skipped.
    "${ADB[@]}" shell "$cmd" >"$log" 2>&1 || true
    printf '%s\t%s\t%s\n' "$f" "$d" "$log" >>"$WORK/runs.tsv"
  done
done

python3 "$HERE/parse_benchmark_model.py" --manifest "$WORK/runs.tsv" --metadata "$BUNDLE/metadata.json" \
  --device-info "$WORK/device.txt" --threads "$THREADS" --out "$OUT"
echo "run_android.sh: report written to $OUT" >&2
python3 - "$OUT" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["results"]:
    p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.3f}"
    print(f"{r['model']:<28} {r['delegate']:<8} mean {r['mean_ms']:.3f} ms  p50 {p50} ms  runs {r['runs']}")
for s in report["skipped"]:
    print(f"skipped {s['model']} [{s['delegate']}]: {s['reason']}")
sys.exit(0 if report["results"] else 1)
EOF
