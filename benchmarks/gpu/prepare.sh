# Source this at the start of every command on a bare GPU machine (see benchmarks/README.md):
# installs the carried wheels (.whl/) into /tmp/site and unpacks prebuilt exllama extensions
# (.gpucache/*.so.gz, made by build_ext.sh) so the minutes-long JIT build runs only once.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
for part in .gpucache/*.so.gz.00; do
  [ -e "$part" ] || continue
  name=$(basename "$part" .gz.00)
  cat "${part%.00}".* | gunzip -c > "/tmp/site/$name"
done
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
