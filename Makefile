# The two commands a new machine needs: `make demo` (main job end to end) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: pip then takes the CPU build on disk instead of the CUDA one from PyPI.
TORCH  := torch==2.13.0

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
