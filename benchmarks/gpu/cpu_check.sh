#!/usr/bin/env bash
# The checks that need the GPU machine's builds but no GPU (`pytest -m "exllama or cuda_build"`),
# run HERE with the torch and the modules cross_build.sh made for the GPU machine: the compiled
# decode step's graphs against inductor's CUDA-graph conditions on fake CUDA tensors
# (tests/test_cuda_graph_readiness.py), and the libraries' own generators, jobs and page
# tables with only the model's forward taken out (tests/page_generator.py): our per-user prefix
# isolation and the serving behaviour that does not depend on the forward, from the model up to
# the real server and the openai SDK. A bug there would otherwise cost a GPU lease to find.
# session.sh runs the same tests on the GPU machine.
#
# Needs what stage.sh makes (.whl/, .gpucache/, WITH_FLASH_ATTN=1 for exllamav2's paged mode)
# and cross_build.sh's scratch venv ($XB/venv: Python 3.12 and the machine's torch build), into
# which the project and its test tools are installed on first use (~2 min).
#
#   bash benchmarks/gpu/cpu_check.sh [pytest args]
#   bash benchmarks/gpu/cpu_check.sh --bench [gpu_serving.py args]   # the benchmark, GPU costs stood in
set -euo pipefail
cd "$(dirname "$0")/../.."
XB=${XB:-/tmp/xllm-xbuild}
[ -x "$XB/venv/bin/python" ] || { echo "cpu_check: run benchmarks/gpu/cross_build.sh first ($XB/venv)" >&2; exit 1; }
[ -d .gpucache/tok ] || { echo "cpu_check: run benchmarks/gpu/stage.sh first (.gpucache/)" >&2; exit 1; }
if ! (cd / && "$XB/venv/bin/python" -c 'import xllm_jupyter, pytest, pytest_asyncio, openai') 2>/dev/null; then
  "$XB/venv/bin/python" -m pip install -q -e . pytest pytest-asyncio pytest-timeout openai
fi
# what the GPU machine does: python3 is the 3.12 interpreter, prepare.sh installs what was staged
# (a wrapper, not a link: a linked interpreter would not find its venv; removed first so that
# nothing is ever written through an old link into the interpreter itself)
mkdir -p "$XB/bin" && rm -f "$XB/bin/python3"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$XB/venv/bin/python" > "$XB/bin/python3"
chmod +x "$XB/bin/python3"
export PATH="$XB/bin:$PATH" XLLM_TEST_TOKENIZER_DIR="$PWD/.gpucache/tok"
# shellcheck source=benchmarks/gpu/prepare.sh
source benchmarks/gpu/prepare.sh
if [ "${1:-}" = --bench ]; then  # gpu_serving.py's raw-vs-server rows over the same generators, GPU costs stood in
  shift
  exec python3 benchmarks/gpu_serving.py --stand-in "$@"
fi
python3 -m pytest -q -rs -p no:cacheprovider -o filterwarnings=ignore::DeprecationWarning -m "exllama or cuda_build" \
  tests/test_prefix_isolation_library.py tests/test_exllama_library_serving.py tests/test_benchmark_tools.py \
  tests/test_exllama_adapters.py tests/test_exllama_api_surface.py \
  tests/test_cuda_graph_readiness.py "$@"
