# The two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.visearch-installed
WEIGHTS := weights/mobilenet_v2-b0353104.pth
DEMO_DIR ?= out/demo

.PHONY: demo test lint install weights proto clean-demo

# Re-install when the dependency list changes; the stamp makes a second run instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(WEIGHTS)

$(WEIGHTS): | $(STAMP)
	$(BIN)/python scripts/fetch_weights.py --out weights

weights: $(WEIGHTS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

proto: install
	$(BIN)/python scripts/gen_protos.py

demo: install
	$(BIN)/python scripts/demo.py --out $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
