# JIT-build the exllamav3 and exllamav2 CUDA extensions (minutes) and pack them into $OUT as
# gzip parts under 16 MiB, to be carried back in .gpucache/ for later commands.
set -u
build() {
  local lib=$1
  local t0=$(date +%s)
  python3 -c "import $lib.ext" > "/tmp/build_$lib.log" 2>&1
  echo "$lib build rc=$? in $(( $(date +%s) - t0 ))s"; tail -3 "/tmp/build_$lib.log"
}
build exllamav3 & build exllamav2 & wait
for lib in exllamav3 exllamav2; do
  so=$(ls ~/.cache/torch_extensions/*/${lib}_ext/${lib}_ext.so 2>/dev/null | head -1)
  [ -n "$so" ] || { echo "no $lib extension built"; continue; }
  ls -la "$so"
  gzip -6 -c "$so" | split -b 15m -d - "$OUT/${lib}_ext.so.gz."
done
ls -la "$OUT"
