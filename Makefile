# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
# Python 3.11 (the torch wheel's; checked when .venv is made)
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# The install is redone only when a requirements file or setup.cfg changes (a stamp on their hash).
REQ_HASH := $(shell cat requirements.txt requirements-nodeps.txt setup.cfg | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup system-deps test test-fast assets demo bench lint clean

setup: $(STAMP) system-deps

# Debian packages: chromium + chromium-driver (tests/test_browser.py), espeak-ng (the corpus builder's fast voice,
# tests/test_corpus_offline.py), PortAudio (`live --mic`) and g++ (TorchInductor's C++ compiler: `--compile`).
# Installed only as root, with apt-get, and only when missing; a failure never fails the install: those tests then
# skip with the reason, and --mic / --compile say what to install.
SYSTEM_PACKAGES := chromium:chromium chromedriver:chromium-driver espeak-ng:espeak-ng g++:g++
system-deps:
	@missing=""; \
	for pair in $(SYSTEM_PACKAGES); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2' || missing="$$missing libportaudio2"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "== not installing$$missing (needs root and apt-get); the tests needing them will skip"; exit 0; fi; \
	echo "== apt-get install$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q $$missing >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1; } \
		|| echo "== could not install$$missing; the tests needing them will skip, --mic and --compile will say what is missing"

# system-deps first (order only: they never make the install stale): simuleval's bitarray builds with the C compiler
$(STAMP): | system-deps
	@echo "== installing pinned dependencies into $(VENV) (first time: about 5 minutes here)"
	@# a .venv left half-built (a killed venv creation, a Python without ensurepip) is made again
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@$(BIN)/python -c "import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
		'$(VENV) is not Python 3.11, which this project needs: rm -rf $(VENV), then make PYTHON=python3.11')"
	$(PIP) install -q $(FIND_LINKS) -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	@# simuleval pulls pytest-flake8, which stops pytest 9 from starting
	$(PIP) uninstall -q -y pytest-flake8 2>/dev/null || true
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, importlib.util as u; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert u.find_spec('torchaudio') is None and u.find_spec('triton') is None, 'torchaudio/triton must not be installed'"
	@rm -f $(VENV)/.installed-*
	@touch $@

assets: setup
	$(BIN)/python -m speech_frontend.assets

test: setup assets
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real" tests

demo: setup
	$(BIN)/python -m simul_agents.demo

# the full offline experiment (hours on 2 CPU cores); resumable: run it again after an interruption
bench: setup
	$(BIN)/python -m simul_agents.bench

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
