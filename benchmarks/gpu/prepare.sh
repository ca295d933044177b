# Source this at the start of every command on a bare GPU machine (see benchmarks/README.md):
# installs the carried wheels (.whl/) into /tmp/site and unpacks prebuilt exllama extensions
# (.gpucache/*.so.gz, made here by cross_build.sh or there by build_ext.sh) so the minutes-long
# JIT build never runs, or runs only once.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
_xllm_pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
# one call is fastest; a wheel the machine refuses (e.g. a newer glibc tag) would fail them all,
# so then each goes alone and only what cannot install is named and left out
if ! $_xllm_pip .whl/*.whl; then
  echo "prepare: the wheels failed together; installing each alone" >&2
  for _xllm_whl in .whl/*.whl; do
    $_xllm_pip "$_xllm_whl" || echo "prepare: left out $(basename "$_xllm_whl")" >&2
  done
fi
# (sourced: its loop variables are prefixed and unset so they never clobber the caller's)
for _xllm_part in .gpucache/*.so.gz.00; do
  [ -e "$_xllm_part" ] || continue
  # written aside, then renamed: truncating a module another run has mapped kills that run (SIGBUS)
  _xllm_so="/tmp/site/$(basename "$_xllm_part" .gz.00)"
  cat "${_xllm_part%.00}".* | gunzip -c > "$_xllm_so.$$" && mv -f "$_xllm_so.$$" "$_xllm_so" || return 1
done
# packages built here whole (cross_build.sh flash_attn: the Python package and its module)
for _xllm_part in .gpucache/*.tgz; do
  [ -e "$_xllm_part" ] && tar -xzf "$_xllm_part" -C /tmp/site
done
unset _xllm_part _xllm_so _xllm_pip _xllm_whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
