# The two commands a new machine needs: `make demo` (main job end to end) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: pip then takes the CPU build on disk instead of the CUDA one from PyPI.
TORCH  := torch==2.13.0

.PHONY: install system-deps test demo study bench clean options-table

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'

# Debian packages the tests use: Chromium drives the annotation page in a real browser, and the
# Fashion-MNIST files are real data for ingestion. Installed when we may (root or password-less
# sudo); elsewhere the tests that need them skip and say why.
SYSTEM_PACKAGES := chromium dataset-fashion-mnist

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "note: Debian packages missing ($$missing): the tests that need them will skip"; exit 0; fi; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing

test: install system-deps
	$(BIN)/python -m pytest

# The main job: digits ingested into shards, then the whole chain (MoCo pretrain, adapt with replay
# and CutMix, naive adapt, progressive labeling, evaluation) through the local backend. Ingestion is
# skipped when its data set is complete; a second `make demo` is a cached re-run of seconds.
DEMO_DATA := data

demo: install
	test -f $(DEMO_DATA)/digits-source/dataset.json || \
	  $(BIN)/unsupft ingest sklearn:digits $(DEMO_DATA)/digits-source --limit 1000 --seed 0 --unlabeled
	test -f $(DEMO_DATA)/digits-target/train/dataset.json || \
	  $(BIN)/unsupft ingest sklearn:digits $(DEMO_DATA)/digits-target --limit 600 --seed 1 --split 0.5
	$(BIN)/unsupft-ctl run jobs/demo.yaml

# The papers' claims in miniature (jobs/study.yaml, issue 12): Fashion-MNIST's 60,000 training
# images (Debian's dataset-fashion-mnist, see system-deps) as the unlabeled source, digits as the
# target; then every stage, three seeds each, and the study page runs/study/study/study.html.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

study: install system-deps
	test -f $(FASHION) || { echo "error: $(FASHION) missing: apt-get install dataset-fashion-mnist"; exit 2; }
	test -f $(DEMO_DATA)/study/fashion/dataset.json || \
	  $(BIN)/unsupft ingest $(FASHION) $(DEMO_DATA)/study/fashion --unlabeled
	test -f $(DEMO_DATA)/study/digits/train/dataset.json || \
	  $(BIN)/unsupft ingest sklearn:digits $(DEMO_DATA)/study/digits --split 0.3 --seed 1
	$(BIN)/unsupft-ctl run jobs/study.yaml

# After changing a stage's options: the static table `unsupft-ctl validate` checks pipelines with.
options-table: install
	$(BIN)/python -m unsupft.options

clean:
	rm -rf $(VENV) runs data build *.egg-info
