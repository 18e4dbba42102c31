# The two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.visearch-installed
WEIGHTS := weights/mobilenet_v2-b0353104.pth weights/efficientnet-lite0-57934424.pth
DEMO_DIR ?= out/demo

.PHONY: demo test lint install weights proto clean-demo browser

# Re-install when the dependency list changes; the stamp makes a second run instant.
# milvus-lite (in the scale extra, part of dev) depends on faiss-cpu, which installs the same
# `faiss` module as faiss-gpu over it: the GPU build would be silently gone. On linux x86_64
# the faiss-gpu version pip chose is reinstalled, files only, when its GPU symbols are missing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ] && ! $(BIN)/python -c \
	    "import faiss, sys; sys.exit(not hasattr(faiss, 'StandardGpuResources'))"; then \
	  $(BIN)/python -m pip install -q --force-reinstall --no-deps \
	    "faiss-gpu==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('faiss-gpu'))")"; \
	fi
	touch $(STAMP)

install: $(STAMP) $(WEIGHTS)

$(WEIGHTS): | $(STAMP)
	$(BIN)/python scripts/fetch_weights.py --out weights

weights: $(WEIGHTS)

test: install browser
	$(BIN)/python -m pytest -q

# The browser test (tests/test_browser.py) drives Debian's Chromium; install it and its
# driver when missing and we are root or may sudo without a password. Never fails: without
# them the test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  exit 0; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make: no chromium and no apt-get: the browser test will be skipped"; \
	elif [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  pkgs="chromium chromium-driver"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$pkgs \
	  || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y --no-install-recommends $$pkgs; } \
	  || echo "make: could not install chromium: the browser test will be skipped"; \
	else \
	  echo "make: no chromium, and neither root nor sudo: the browser test will be skipped"; \
	fi

lint: install
	$(BIN)/ruff check .

proto: install
	$(BIN)/python scripts/gen_protos.py

demo: install
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
