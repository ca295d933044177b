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
# `flash_attn` (not built by default) builds flash-attn 2's forward kernels the same way, for
# exllamav2's paged mode (its continuous batching), which cannot be built within a lease: the
# library's own sources and build macros, backward pass, dropout, ALiBi, softcap, local windows
# and head dims not a multiple of 32 compiled out (the flags its setup.py lists). That serves
# exllamav2 on Llama-shaped models, enough for the benchmark, not a general flash-attn. The
# backward kernels its dispatcher still names are stand-ins that raise (mha_bwd refuses first).
# 48 forward kernel files (~56 s each): 19 min on 2 cores here; 6.1 MB packed.
#
#   bash benchmarks/gpu/cross_build.sh [exllamav3] [exllamav2] [flash_attn]   # the exllamas by default
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
XB=${XB:-/tmp/xllm-xbuild}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}   # must match the GPU machine's torch (2.11.0+cu130)
FLASH_ATTN_SPEC=${FLASH_ATTN_SPEC:-flash-attn==2.8.3.post2}
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
build_flash_attn() (  # a subshell, so errexit holds inside it even when called with ||
  set -euo pipefail
  rm -rf "$XB/fa" && mkdir -p "$XB/fa/pkg"
  # the sdist only (its setup.py needs torch to report metadata: no isolation, no CUDA build)
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$XB/venv/bin/python" -m pip download -q --no-deps --no-binary :all: \
    --no-build-isolation "$FLASH_ATTN_SPEC" -d "$XB/fa"
  tar -xzf "$XB"/fa/flash_attn-*.tar.gz -C "$XB/fa"
  src=$(ls -d "$XB"/fa/flash_attn-*/ | head -1)
  CUDA_HOME=$XB/cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} FA_SRC=$src FA_BUILD=$XB/ext/flash_attn_2_cuda \
    "$XB/venv/bin/python" - <<'PY'
import glob, os, re
from torch.utils.cpp_extension import load

src, build = os.environ["FA_SRC"], os.environ["FA_BUILD"]
os.makedirs(build, exist_ok=True)
off = [f"-DFLASHATTENTION_DISABLE_{x}" for x in ("BACKWARD", "DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K", "LOCAL")]
nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "--expt-relaxed-constexpr",
        "--expt-extended-lambda", "--use_fast_math", *off]
kernels = sorted(glob.glob(f"{src}/csrc/flash_attn/src/flash_fwd_*_sm80.cu"))
# With FLASHATTENTION_DISABLE_BACKWARD, mha_bwd refuses before it dispatches, but the dispatcher
# still names every backward kernel; these never-called stand-ins satisfy the linker instead of
# 24 backward kernel files
dims = sorted({int(re.search(r"hdim(\d+)", k).group(1)) for k in kernels})
stubs = [f"template<> void run_mha_bwd_<cutlass::{t}, {d}, {c}>(Flash_bwd_params &, cudaStream_t) "
         f"{{ throw std::runtime_error(\"flash-attn backward is not built\"); }}"
         for t in ("half_t", "bfloat16_t") for d in dims for c in ("false", "true")]
stub_file = os.path.join(build, "backward_not_built.cpp")
with open(stub_file, "w") as f:
    f.write("#include <stdexcept>\n#include <cutlass/numeric_types.h>\n#include \"flash.h\"\n"
            "namespace FLASH_NAMESPACE {\n" + "\n".join(stubs) + "\n}\n")
load(name="flash_attn_2_cuda", sources=[f"{src}/csrc/flash_attn/flash_api.cpp", stub_file, *kernels], build_directory=build,
     extra_cflags=["-O3", "-std=c++17", *off], extra_cuda_cflags=nvcc,
     extra_include_paths=[f"{src}/csrc/flash_attn", f"{src}/csrc/flash_attn/src", f"{src}/csrc/cutlass/include"])
print(f"flash_attn_2_cuda: {len(kernels)} forward kernel files")
PY
  pkg=$XB/fa/pkg
  cp -r "$src/flash_attn" "$pkg/" && cp "$XB/ext/flash_attn_2_cuda/flash_attn_2_cuda.so" "$pkg/"
  tar -czf .gpucache/flash_attn.tgz -C "$pkg" flash_attn flash_attn_2_cuda.so
  (cd "$pkg" && "$XB/venv/bin/python" -c "import torch, flash_attn, flash_attn_2_cuda; print('cross_build: flash_attn', flash_attn.__version__, 'loads')")
)

mkdir -p .gpucache
for lib in "${LIBS[@]}"; do
  t0=$(date +%s)
  echo "cross_build: building $lib (log: $XB/build_$lib.log)"
  if [ "$lib" = flash_attn ]; then
    build_flash_attn > "$XB/build_$lib.log" 2>&1 || { tail -20 "$XB/build_$lib.log"; exit 1; }
    echo "cross_build: flash_attn built in $(( $(date +%s) - t0 ))s, $(du -h .gpucache/flash_attn.tgz | cut -f1) packed"
    tail -1 "$XB/build_$lib.log"
    continue
  fi
  # a build killed midway (a session's end) leaves torch's lock file, and the next import waits on it forever
  # without a word: one cross_build runs at a time, so a lock here is stale
  rm -f "$XB/ext/${lib}_ext/lock"
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
