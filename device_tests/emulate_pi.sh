#!/usr/bin/env bash
# Run bench.py on an emulated 64-bit Raspberry Pi: Debian bookworm arm64 userland (what Raspberry Pi OS
# bookworm is built on: Python 3.11, glibc 2.36) with numpy<2 and tflite-runtime 2.14.0 aarch64 wheels,
# executed by qemu-user.
#
#   device_tests/emulate_pi.sh [--json OUT] [--threads N] [--runs N] [--warmup N] [--max-eval N] RUN_DIR
#
# RUN_DIR is a run directory written by `edgekd export` (a bundle is made from it) or a bundle folder
# (it holds bench.py). The JSON report is written to OUT (default ./pi_emulated.json). --threads defaults
# to 1 here (see below); --max-eval N measures accuracy on the first N eval samples only, since every
# emulated inference costs milliseconds.
#
# What is emulated and what is not: the instructions are aarch64 and the libraries are Debian bookworm's
# (Raspberry Pi OS bookworm is built on them), so the accuracy is what a Pi computes; the latency is
# qemu's translation speed on this host, marked "emulated": true, and says nothing about a real Pi.
# tflite-runtime is the runtime here because it runs under qemu-user; the ai-edge-litert and onnxruntime
# aarch64 wheels crash under qemu-user, so ONNX models are reported as skipped.
#
# The userland is built once and cached in ${EDGEKD_PI_CACHE:-$HOME/.cache/edgekd/pi-bookworm-arm64}.
# It needs no binfmt_misc registration (often unavailable in containers): debootstrap runs only its first
# stage, which downloads and unpacks packages on the host without executing target binaries; the Python
# packages are unpacked the same way, the wheels are installed by the host's pip for the aarch64
# platform, and the interpreter is started through qemu-aarch64-static explicitly inside a chroot.
# Needs root (debootstrap, chroot) and the Debian packages qemu-user-static and debootstrap.
#
# Environment: EDGEKD_PI_CACHE (cache dir), EDGEKD_DEBIAN_MIRROR (default http://deb.debian.org/debian),
# EDGEKD_PYTHON (host Python with pip, used for bundling and downloading wheels).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CACHE="${EDGEKD_PI_CACHE:-${HOME:-/root}/.cache/edgekd/pi-bookworm-arm64}"
MIRROR="${EDGEKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
DEB_PACKAGES="python3,python3-pip,python3-venv"
WHEELS=("numpy<2" "tflite-runtime==2.14.0")
# Any change to what goes into the userland must change this key, so stale caches are rebuilt.
CACHE_KEY="edgekd-pi-v1 $SUITE arm64 minbase $DEB_PACKAGES ${WHEELS[*]}"
PY_SITE=/usr/local/lib/python3.11/dist-packages

die() { echo "emulate_pi.sh: error: $*" >&2; exit 2; }
log() { echo "emulate_pi.sh: $*" >&2; }

usage() { sed -n '6p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2; exit 2; }

OUT="$PWD/pi_emulated.json"
BENCH_ARGS=()
RUN_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) [ $# -ge 2 ] || usage; OUT="$2"; shift 2 ;;
    --threads|--runs|--warmup|--max-eval)
      [ $# -ge 2 ] || usage; BENCH_ARGS+=("$1" "$2"); shift 2 ;;
    -h|--help) usage ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$RUN_DIR" ] || die "only one RUN_DIR may be given"; RUN_DIR="$1"; shift ;;
  esac
done
[ -n "$RUN_DIR" ] || usage
# One thread unless asked otherwise: under qemu-user, XNNPACK's worker threads spin on each other and a
# second thread makes inference about five times slower (measured: 7 ms vs 39 ms for a small MNIST CNN).
case " ${BENCH_ARGS[*]-} " in *" --threads "*) ;; *) BENCH_ARGS+=(--threads 1) ;; esac
[ -d "$RUN_DIR" ] || die "$RUN_DIR is not a directory"
[ -f "$RUN_DIR/metadata.json" ] || die "$RUN_DIR/metadata.json not found: pass a run directory or a bundle"
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"
for tool in qemu-aarch64-static debootstrap dpkg-deb chroot flock; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: apt-get install qemu-user-static debootstrap"
done

pick_python() {
  local candidates=("${EDGEKD_PYTHON:-}" "$REPO/.venv/bin/python" python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  return 1
}
CHROOT="$(command -v chroot)"  # resolved now: the clean environment below has no sbin on PATH
HOST_PY="$(pick_python)" || die "no host Python with pip found (set EDGEKD_PYTHON)"

mkdir -p "$CACHE"
ROOTFS="$CACHE/rootfs"
# One build or run at a time per cache: a second caller waits instead of racing on the rootfs.
exec 9>"$CACHE/.lock"
flock 9

build_rootfs() {
  local tmp="$CACHE/rootfs.tmp.$$"
  rm -rf "$tmp" "$CACHE"/rootfs.tmp.* "$CACHE"/stage.*  # leftovers of an interrupted build
  log "building the arm64 userland in $CACHE (first run only)"
  local t0=$SECONDS
  debootstrap --arch=arm64 --foreign --variant=minbase --include="$DEB_PACKAGES" \
    "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed (see $CACHE/debootstrap.log)"
  # Stage one unpacked only the essential packages; unpack the rest (python3 and its dependencies)
  # into a staging folder first, because bookworm's /bin, /lib and /sbin are symlinks into /usr and
  # unpacking straight into the rootfs would replace those symlinks with real directories.
  local stage="$CACHE/stage.$$"
  rm -rf "$stage"; mkdir -p "$stage"
  local pkg deb
  for pkg in $(cat "$tmp/debootstrap/base"); do
    deb="$(awk -v p="$pkg" '$1 == p { print $2 }' "$tmp/debootstrap/debpaths")"
    [ -n "$deb" ] || die "debootstrap did not download $pkg"
    dpkg-deb -x "$tmp$deb" "$stage" || die "cannot unpack $deb"
  done
  local d
  for d in bin sbin lib; do
    if [ -d "$stage/$d" ] && [ ! -L "$stage/$d" ]; then
      mkdir -p "$stage/usr/$d"
      cp -a "$stage/$d/." "$stage/usr/$d/"
      rm -rf "${stage:?}/$d"
    fi
  done
  cp -a "$stage/." "$tmp/"
  rm -rf "$stage" "$tmp"/var/cache/apt/archives/*.deb
  cp "$(command -v qemu-aarch64-static)" "$tmp/usr/bin/qemu-aarch64-static"
  log "userland unpacked in $((SECONDS - t0)) s; installing ${WHEELS[*]} (aarch64 wheels)"

  mkdir -p "$CACHE/wheels"
  local plat=(--only-binary=:all: --platform manylinux_2_34_aarch64 --platform manylinux2014_aarch64
              --python-version 3.11 --implementation cp --abi cp311)
  "$HOST_PY" -m pip download -q --no-deps "${plat[@]}" -d "$CACHE/wheels" "${WHEELS[@]}" \
    || die "pip could not download the aarch64 wheels of ${WHEELS[*]}"
  "$HOST_PY" -m pip install -q --no-deps --no-index "${plat[@]}" --target "$tmp$PY_SITE" \
    "$CACHE"/wheels/*.whl || die "pip could not install the aarch64 wheels into the userland"
  echo "$CACHE_KEY" >"$tmp/.edgekd-stamp"
  run_in_pi "$tmp" /usr/bin/python3 -c \
    "import numpy, tflite_runtime.interpreter as t; print('numpy', numpy.__version__, 'tflite_runtime', t.__name__)" \
    >/dev/null || die "the emulated Python cannot import numpy and tflite_runtime"
  rm -rf "$ROOTFS"
  mv "$tmp" "$ROOTFS"
  log "userland ready in $((SECONDS - t0)) s"
}

# run_in_pi ROOTFS CMD...: run an aarch64 program in the userland with a clean environment.
run_in_pi() {
  local root="$1"; shift
  # tflite's cpuinfo reads the processor lists from sysfs, which the chroot does not mount; give it the
  # host's core count so it initializes instead of printing errors.
  local n; n="$(nproc)"
  mkdir -p "$root/sys/devices/system/cpu"
  for f in possible present online; do echo "0-$((n - 1))" >"$root/sys/devices/system/cpu/$f"; done
  # It also reads /proc/cpuinfo to identify the cores, and without it XNNPACK (the CPU kernels a Pi
  # uses) is not enabled. Give it the host's core count described as a Pi 4's Cortex-A72 (part 0xd08),
  # labelled as emulated so nobody mistakes the report for a real board.
  if [ -L "$root/proc" ]; then rm "$root/proc"; fi  # debootstrap links it to the host /proc in containers
  mkdir -p "$root/proc"
  {
    local i
    for ((i = 0; i < n; i++)); do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
      printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
      printf 'CPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated by qemu-user)\n'
  } >"$root/proc/cpuinfo"
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    "$CHROOT" "$root" /usr/bin/qemu-aarch64-static "$@"
}

if [ ! -f "$ROOTFS/.edgekd-stamp" ] || [ "$(cat "$ROOTFS/.edgekd-stamp")" != "$CACHE_KEY" ]; then
  build_rootfs
else
  log "using the cached arm64 userland in $ROOTFS"
fi

# The bundle: as given, or made from the run directory with edgekd.bundle.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ -f "$RUN_DIR/bench.py" ]; then
  BUNDLE="$RUN_DIR"
else
  BUNDLE="$WORK/bundle"
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$HOST_PY" -m edgekd.bundle "$RUN_DIR" "$BUNDLE" >/dev/null \
    || die "could not make a bundle from $RUN_DIR"
fi
rm -rf "$ROOTFS/home/pi"
mkdir -p "$ROOTFS/home/pi"
cp -a "$BUNDLE" "$ROOTFS/home/pi/bundle"

log "running bench.py under qemu-aarch64 (tflite_runtime)"
set +e
run_in_pi "$ROOTFS" /usr/bin/python3 /home/pi/bundle/bench.py /home/pi/bundle --runtime tflite --emulated \
  --json /home/pi/pi_emulated.json "${BENCH_ARGS[@]}"
status=$?
set -e
if [ -f "$ROOTFS/home/pi/pi_emulated.json" ]; then
  mkdir -p "$(dirname "$OUT")"
  # Record which emulator produced the numbers; the chroot cannot see it.
  QEMU_VERSION="$(qemu-aarch64-static --version | head -n1)" "$HOST_PY" - "$ROOTFS/home/pi/pi_emulated.json" "$OUT" <<'EOF'
import json, os, sys
report = json.load(open(sys.argv[1]))
report["device"]["emulator"] = os.environ["QEMU_VERSION"] + " (qemu-user), Debian bookworm arm64 userland"
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
  log "report written to $OUT"
fi
exit $status
