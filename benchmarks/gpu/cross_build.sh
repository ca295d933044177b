#!/usr/bin/env bash
# Build the exllamav3 and exllamav2 CUDA extensions HERE, on a CPU machine, for the GPU machine
# (H100/H200: sm_90, Python 3.12, torch 2.11.0+cu130), and pack them into .gpucache/ as gzip
# parts under 16 MiB that benchmarks/gpu/prepare.sh unpacks there. The libraries' JIT build
# took ~5.5 min (exllamav3) and ~2.3 min (exllamav2) of a 15-minute device lease; built here
# it costs none (18 + 5 min on 2 cores here, in the background).
#
# Needs: nvcc 13.0 (CUDA_HOME, default /usr/local/cuda), a Python 3.12 (PYTHON312, default
# python3.12 or pyenv's 3.12), and the exllama wheels in .whl/ (fetch_wheels.py). The extension
# is compiled by the library's own build code (its sources, flags and torch's cpp_extension),
# in a scratch venv holding the same torch build as the GPU machine. Headers that a minimal
# CUDA install lacks (cuSPARSE, cuBLAS, ...) come from that torch's nvidia wheels.
#
#   bash benchmarks/gpu/cross_build.sh [exllamav3] [exllamav2]     # both by default
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
XB=${XB:-/tmp/xllm-xbuild}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}   # must match the GPU machine's torch (2.11.0+cu130)
CUDA_HOME_IN=${CUDA_HOME:-/usr/local/cuda}
LIBS=("$@"); [ ${#LIBS[@]} -gt 0 ] || LIBS=(exllamav3 exllamav2)

py312=${PYTHON312:-}
if [ -z "$py312" ]; then
  if command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12* >/dev/null 2>&1; then
    py312=$(ls -d "$(pyenv root)"/versions/3.12* | tail -1)/bin/python3.12
  else
    py312=python3.12
  fi
fi
"$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "cross_build: need Python 3.12 (set PYTHON312)" >&2; exit 1; }
"$CUDA_HOME_IN/bin/nvcc" --version | grep -q "release 13.0" \
  || { echo "cross_build: need nvcc 13.0 at $CUDA_HOME_IN (the GPU machine's CUDA)" >&2; exit 1; }
ls .whl/exllamav3-*.whl .whl/exllamav2-*.whl >/dev/null \
  || { echo "cross_build: run benchmarks/gpu/fetch_wheels.py first" >&2; exit 1; }

# 1. a scratch venv with the GPU machine's torch build and the libraries (with their deps: the
#    build imports the package)
if [ ! -x "$XB/venv/bin/python" ]; then
  "$py312" -m venv "$XB/venv"
  "$XB/venv/bin/python" -m pip install -q --upgrade pip
fi
"$XB/venv/bin/python" -m pip install -q "$TORCH_SPEC" .whl/exllamav3-*.whl .whl/exllamav2-*.whl
"$XB/venv/bin/python" -c 'import torch; v = torch.__version__; assert v.endswith("+cu130"), v; print("torch", v)'

# 2. a CUDA home: the toolkit's nvcc and headers, plus the headers and libraries it lacks from
#    torch's nvidia wheels (symlinks; the toolkit's own files win)
NV=$("$XB/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
rm -rf "$XB/cuda" && mkdir -p "$XB/cuda/include" "$XB/cuda/lib64"
for d in bin nvvm targets; do [ -e "$CUDA_HOME_IN/$d" ] && ln -s "$(readlink -f "$CUDA_HOME_IN/$d")" "$XB/cuda/$d"; done
for f in "$CUDA_HOME_IN"/include/* "$NV"/include/*; do
  [ -e "$XB/cuda/include/$(basename "$f")" ] || ln -s "$f" "$XB/cuda/include/"
done
for f in "$CUDA_HOME_IN"/lib64/* "$NV"/lib/*; do
  b=$(basename "$f"); [ -e "$XB/cuda/lib64/$b" ] || ln -s "$f" "$XB/cuda/lib64/$b"
  case $b in *.so.*) u=${b%%.so.*}.so; [ -e "$XB/cuda/lib64/$u" ] || ln -s "$f" "$XB/cuda/lib64/$u";; esac
done

# 3. build each with the library's own JIT path, then check the module loads against torch
mkdir -p .gpucache
for lib in "${LIBS[@]}"; do
  t0=$(date +%s)
  echo "cross_build: building $lib (log: $XB/build_$lib.log)"
  # the import JIT-builds, then loads the module; loading may fail here (no GPU driver), the .so stays
  CUDA_HOME=$XB/cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_EXTENSIONS_DIR=$XB/ext \
    "$XB/venv/bin/python" -c "import $lib.ext" > "$XB/build_$lib.log" 2>&1 || true
  so=$XB/ext/${lib}_ext/${lib}_ext.so
  [ -f "$so" ] || { tail -20 "$XB/build_$lib.log"; echo "cross_build: $lib did not build" >&2; exit 1; }
  echo "cross_build: $lib built in $(( $(date +%s) - t0 ))s, $(du -h "$so" | cut -f1)"
  rm -f ".gpucache/${lib}_ext.so.gz."*
  gzip -6 -c "$so" | split -b 15m -d - ".gpucache/${lib}_ext.so.gz."
  # every symbol must resolve against this torch (the GPU machine's build); only the CUDA driver is absent
  (cd "$XB/ext/${lib}_ext" && "$XB/venv/bin/python" -c "import torch, ${lib}_ext; print('cross_build: ${lib}_ext loads:', len(dir(${lib}_ext)), 'names')")
done
ls -la .gpucache
