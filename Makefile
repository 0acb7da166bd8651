# Two commands: `make demo` runs the main job on the embedded CPU default, `make test` runs ruff + pytest.
# Both bootstrap .venv by themselves on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip
	@# A CPU build of torch where there is no NVIDIA GPU (a plain `torch` pulls the multi-GB CUDA build).
	@$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	  else \
	    $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	  fi; }
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nanoseek.cli speedrun

lint: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks
	$(PY) -m ruff format --check nanoseek tests benchmarks

test: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks
	$(PY) -m ruff format --check nanoseek tests benchmarks
	$(PY) -m pytest

clean:
	rm -rf .venv runs *.egg-info
