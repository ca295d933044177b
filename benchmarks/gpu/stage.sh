#!/usr/bin/env bash
# Here, before any device call (no device time): everything a GPU session carries.
#   .whl/       wheels the GPU machine lacks (fetch_wheels.py)
#   .gpucache/  SmolLM2's tokenizer (tok/) and the prebuilt exllama extensions (cross_build.sh,
#               ~25 min on 2 cores: start it early, in the background); WITH_FLASH_ATTN=1 adds
#               flash-attn's forward kernels for exllamav2's paged mode (~20 min more)
# Then: run(command="bash benchmarks/gpu/session.sh ...", carry=[".whl", ".gpucache"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python benchmarks/gpu/fetch_wheels.py
.venv/bin/python - <<'PY'
from pathlib import Path

from tests.models import smollm2_tokenizer

out = Path(".gpucache/tok")
if not (out / "tokenizer.json").exists():
    smollm2_tokenizer().save_pretrained(str(out))
print("tokenizer:", sorted(p.name for p in out.iterdir()))
PY
[ "${SKIP_CROSS_BUILD:-0}" = 1 ] || bash benchmarks/gpu/cross_build.sh exllamav3 exllamav2 ${WITH_FLASH_ATTN:+flash_attn}
du -ch .whl .gpucache | tail -1
