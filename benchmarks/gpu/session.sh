#!/usr/bin/env bash
# The GPU checks of issues 3 and 7 as one prepared command on the device machine, in phases
# run in the order given, each under a time cap, all under one deadline (a lease is 15 minutes
# of device time, machine start included; one command may run 10). A phase that would not
# fit in what is left is skipped and says so; results and logs are copied into $OUT after
# every phase, so a call cut short still brings back what finished.
#
# A phase written NAME& runs in the background (the GPU tests beside the EXL3 conversion, say:
# neither is timed); the phase "wait" waits for those, and the session waits for them before it
# ends. Benchmarks must run alone: put them after a "wait". NAME:SECONDS caps a phase below the
# time left (wait:SECONDS stops the background phases still running after that long), so a slow
# phase cannot eat the time of the benchmark after it. A copy into $OUT also runs every 15 s,
# so a call stopped from outside (the lease running out) still brings back the logs so far.
#
# Here first (no device time): benchmarks/gpu/stage.sh (wheels, tokenizer, prebuilt
# extensions). Then, on the device, carrying .whl and .gpucache:
#   bash benchmarks/gpu/session.sh --deadline 560 setup make1b 'convert1b&' tests:250 wait:100 bench1b v2paged
#   bash benchmarks/gpu/session.sh --deadline $((BUDGET_LEFT - 40)) setup make1b users1b v2 compiled1b
# the second at once (the machine goes back after 30 s idle), its deadline from the lease's
# budget_left_s in the first call's reply (the device tool stops a call at the lease's end, before
# this script's deadline would). Details: benchmarks/README.md.
#
# Phases (estimated seconds on an H100/H200 with prebuilt extensions):
#   setup       install carried wheels and extensions; JIT-build what is not prebuilt   (20; 330 without)
#   tests       pytest -m "gpu or exllama or cuda_build": test_gpu_backends, test_gpu_engine_options,
#               test_hf_compiled, test_sampling, test_cuda_graph_readiness, test_exllama_api_surface, then
#               the CPU stand-in suites cpu_check.sh runs here too (last: a phase cut at its cap loses
#               those first), test_prefix_isolation_library, test_exllama_library_serving  (240)
#   make1b      random-weight Llama 1.17B fp16 with SmolLM2's tokenizer                 (30)
#   convert1b   EXL3 4.0 bpw with exllamav3's converter                                (150)
#   bench1b     gpu_serving.py: EXL3 (if converted) and FP16 on exllamav3, 1/16/64       (150)
#   users1b     gpu_serving.py: EXL3 on exllamav3, 64 streams from 64 users' keys         (60)
#   v2          gpu_serving.py: FP16 on exllamav2 unpaged (EXLLAMA_NO_FLASH_ATTN), 1 stream (60)
#   v2paged     gpu_serving.py: FP16 on exllamav2 paged (carried flash-attn), 1/16/64 (120)
#   compiled1b  gpu_serving.py: FP16 on transformers-compiled (CUDA graphs), 1/16/64     (240)
#   steps1b     compiled_step.py: one compiled decode step, guards checked vs skipped     (180)
#   make8b      random-weight 8B shape fp16                                             (90)
#   bench8b     gpu_serving.py: 8B FP16 on exllamav3, 1/16/64                            (180)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-session-out}
WORK=${GPU_SESSION_WORK:-/tmp/gpu-session}
DEADLINE=540
START=$(date +%s)
if [ "${1:-}" = "--deadline" ]; then DEADLINE=$2; shift 2; fi
PHASES=("$@")
mkdir -p "$OUT" "$WORK/logs"
RESULTS=$WORK/gpu_serving.json
TOK=$PWD/.gpucache/tok
export XLLM_TEST_TOKENIZER_DIR=$TOK PYTHONUNBUFFERED=1 OUT RESULTS WORK TOK

declare -A COST=([setup]=20 [tests]=240 [make1b]=30 [convert1b]=150 [bench1b]=150 [users1b]=60 [v2]=60 [v2paged]=120
                 [compiled1b]=240 [steps1b]=180 [make8b]=90 [bench8b]=180)

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
note() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
collect() {
  [ -f "$RESULTS" ] && cp "$RESULTS" "${RESULTS%.json}.md" "$OUT/" 2>/dev/null
  [ -f "$WORK/compiled_step.json" ] && cp "$WORK"/compiled_step.{json,md} "$OUT/" 2>/dev/null
  # written aside (a name per process: the periodic copy and a phase's may overlap) and renamed, so a call
  # stopped mid-copy keeps the last whole archive
  local part="$OUT/.logs.$BASHPID.part"
  tar -czf "$part" -C "$WORK" logs 2>/dev/null && mv -f "$part" "$OUT/logs.tar.gz" || rm -f "$part"
}
bench() {  # gpu_serving.py into this session's results file
  python3 benchmarks/gpu_serving.py --out "$RESULTS" "$@"
}

phase_setup() {
  # shellcheck source=prepare.sh
  source benchmarks/gpu/prepare.sh || return 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
  local builds=()
  for lib in exllamav3 exllamav2; do
    # a prebuilt module that does not load here is removed, so the library JIT-builds instead
    if [ -f "/tmp/site/${lib}_ext.so" ] && ! python3 -c "import torch, ${lib}_ext" 2>"$WORK/logs/${lib}_ext_load.txt"; then
      echo "prebuilt ${lib}_ext does not load: $(tail -1 "$WORK/logs/${lib}_ext_load.txt"); JIT build instead"
      rm -f "/tmp/site/${lib}_ext.so"
    fi
    if [ -f "/tmp/site/${lib}_ext.so" ]; then echo "${lib}_ext: prebuilt"; else
      echo "${lib}_ext: JIT build (minutes)"
      python3 -c "import ${lib}.ext" > "$WORK/logs/jit_${lib}.log" 2>&1 &
      builds+=($!)
    fi
  done
  # flash-attn's module (cross_build.sh) is checked the same way: one that does not load is removed, so
  # exllamav2 runs unpaged instead of failing on import
  if [ -d /tmp/site/flash_attn ] && ! python3 -c "import torch, flash_attn_2_cuda" 2>"$WORK/logs/flash_attn_load.txt"; then
    echo "carried flash-attn does not load: $(tail -1 "$WORK/logs/flash_attn_load.txt"); exllamav2 runs unpaged"
    rm -rf /tmp/site/flash_attn /tmp/site/flash_attn_2_cuda.so
  fi
  [ ${#builds[@]} -eq 0 ] || wait "${builds[@]}"  # (not a bare wait: the periodic copy is a child too)
}
phase_tests() {  # (recompiles and skipped CUDA graphs named in the log; the slowest tests listed)
  TORCH_LOGS=recompiles,cudagraphs python3 -m pytest -q -rs --durations=15 -p no:cacheprovider \
    -o filterwarnings=ignore::DeprecationWarning -m "gpu or exllama or cuda_build" \
    --junitxml="$OUT/gpu_tests.xml" tests/test_gpu_backends.py tests/test_gpu_engine_options.py tests/test_hf_compiled.py \
    tests/test_sampling.py tests/test_cuda_graph_readiness.py tests/test_exllama_api_surface.py \
    tests/test_prefix_isolation_library.py tests/test_exllama_library_serving.py
}
phase_make1b() { bench --make 1b --make-out "$WORK/llama1b" --tokenizer "$TOK"; }
phase_convert1b() {
  [ -f "$WORK/llama1b-exl3/config.json" ] && return 0
  python3 -m exllamav3.conversion.convert_model -i "$WORK/llama1b" -o "$WORK/llama1b-exl3" -w "$WORK/convwork" \
    -b 4.0 -cr 16 -cc 512
}
phase_bench1b() {  # the EXL3 rows first (the figure to keep); FP16 alone if the conversion did not finish
  local models=()
  [ -f "$WORK/llama1b-exl3/config.json" ] && models+=(--model "exl3-1.2b=$WORK/llama1b-exl3")
  bench "${models[@]}" --model "fp16-1.2b=$WORK/llama1b" --backends exllamav3
}
phase_users1b() { bench --model "exl3-1.2b=$WORK/llama1b-exl3" --backends exllamav3 --streams 64 --users 64; }
phase_v2() { export EXLLAMA_NO_FLASH_ATTN=1; bench --model "fp16-1.2b=$WORK/llama1b" --backends exllamav2 --v2-streams 1; }
phase_v2paged() {
  python3 -c "import flash_attn" || { echo "no flash-attn carried (cross_build.sh flash_attn)"; return 1; }
  bench --model "fp16-1.2b-paged=$WORK/llama1b" --backends exllamav2 --v2-streams 1,16,64
}
phase_compiled1b() { bench --model "fp16-1.2b=$WORK/llama1b" --backends transformers-compiled; }
phase_steps1b() {  # one compiled decode step of the 1.2B FP16 model: eager / guards checked / skipped
  python3 benchmarks/compiled_step.py --device cuda --model "$WORK/llama1b" --slots 64 --slot-tokens 1024 \
    --shapes 2x256,2x512,16x512,64x512 --rounds 5 --calls 20 --label gpu-1b --out "$WORK/compiled_step"
}
phase_make8b() { bench --make 8b --make-out "$WORK/llama8b" --tokenizer "$TOK"; }
phase_bench8b() { bench --model "fp16-8b=$WORK/llama8b" --backends exllamav3; }

capped() {  # CAP: the time left, or CAP seconds if that is less (CAP empty: the time left)
  local l; l=$(left)
  if [ -n "$1" ] && [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}
run_phase() {  # NAME [CAP]: run it under the time left (or its cap), its output in logs/NAME.log; returns its exit code
  local p=$1
  if [ "$p" = setup ]; then  # in this shell: its exports must reach the later phases
    phase_setup > "$WORK/logs/$p.log" 2>&1
  else
    # in a child shell, so the time cap stops it with everything it started (timeout signals its process group)
    # SIGINT first: pytest then still prints its summary and writes its junitxml, gpu_serving.py stops its server
    timeout -s INT --kill-after=10 "$(capped "${2:-}")" bash -c "$(declare -f bench "phase_$p"); phase_$p" \
      > "$WORK/logs/$p.log" 2>&1
  fi
}
finish_phase() {  # NAME RC START: one summary line, results and logs into $OUT
  note "$1: rc=$2 in $(( $(date +%s) - $3 ))s; $(tail -1 "$WORK/logs/$1.log" | cut -c1-200)"
  collect
}
stop_group() {  # PID of a background phase: TERM the process group its timeout leads (the phase and all it started)
  local p
  for p in "$1" $(pgrep -P "$1"); do
    if [ "$(ps -o pgid= -p "$p" | tr -d ' ')" = "$p" ]; then kill -TERM -- "-$p" 2>/dev/null; return; fi
  done
  pkill -TERM -P "$1"
}
wait_background() {  # [CAP]: wait for the background phases; after CAP seconds (or at the deadline) stop them
  local name limit; limit=$(capped "${1:-}")
  local until=$(( $(date +%s) + limit ))
  for name in "${!BG[@]}"; do
    while kill -0 "${BG[$name]}" 2>/dev/null && [ "$(date +%s)" -lt "$until" ]; do sleep 1; done
    if kill -0 "${BG[$name]}" 2>/dev/null; then
      note "$name: stopped (still running after the wait's ${limit}s)"
      stop_group "${BG[$name]}"
    fi
    wait "${BG[$name]}"; finish_phase "$name" $? "${BG_START[$name]}"
  done
  BG=(); BG_START=()
}

declare -A BG=() BG_START=()
note "session: phases ${PHASES[*]}, deadline ${DEADLINE}s"
( while sleep 15; do collect; done ) >/dev/null 2>&1 &
COPIER=$!
for p in "${PHASES[@]}"; do
  # (phase_setup sources prepare.sh, which leaves no variables behind to clobber these)
  spec=${p%&}; name=${spec%%:*}; cap=""
  [ "$spec" != "$name" ] && cap=${spec#*:}
  if [ "$name" = wait ]; then wait_background "$cap"; continue; fi
  if ! declare -F "phase_$name" >/dev/null; then note "$name: unknown phase"; continue; fi
  cost=${COST[$name]:-60}
  [ -n "$cap" ] && [ "$cap" -lt "$cost" ] && cost=$cap  # a capped phase needs only its cap
  if [ "$(left)" -lt "$cost" ]; then note "$name: SKIPPED (needs ~${cost}s, $(left)s left)"; continue; fi
  t0=$(date +%s)
  if [ "$p" != "$spec" ] && [ "$name" != setup ]; then
    note "$name: started in the background"
    run_phase "$name" "$cap" & BG[$name]=$!; BG_START[$name]=$t0
  else
    run_phase "$name" "$cap"; finish_phase "$name" $? "$t0"
  fi
done
wait_background
# the periodic copy stops first (a tar of its own killed mid-way never replaces the archive)
pkill -P "$COPIER" 2>/dev/null; kill "$COPIER" 2>/dev/null; wait "$COPIER" 2>/dev/null
note "session: done"
collect
