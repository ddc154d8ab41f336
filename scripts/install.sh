#!/usr/bin/env bash
# Installs everything tvm-effconv needs on a fresh Debian/Ubuntu x86_64 machine, idempotently:
#   1. system packages, only when missing: the aarch64 cross compiler and qemu-user (emulated device), and
#      LLVM 17 or newer for llvm-mca (the benchmark suite's ARM estimates need its Neoverse N1 model);
#   2. a virtual environment in .venv with the pinned Python packages, this project (editable) and the
#      benchmark suite's peers (the `bench` extra: ONNX Runtime, onnx, matplotlib);
#   3. the emulated aarch64 device's sysroot (Python + TVM for aarch64), cached in ~/.cache/tvm-effconv.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
have_mca=""
for mca in /usr/lib/llvm-*/bin/llvm-mca; do
    version=${mca#/usr/lib/llvm-}
    [ -x "$mca" ] && [ "${version%%/*}" -ge 17 ] 2>/dev/null && have_mca=1
done
[ -n "$have_mca" ] || missing+=(llvm-19)
if ((${#missing[@]})); then
    echo "installing system packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# pip's warnings about absent local package mirrors are noise; real errors still fail the script.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import tvm, torch, tvm_effconv" || { echo "install failed: see the pip output above" >&2; exit 1; }
.venv/bin/python -m tvm_effconv.device setup
