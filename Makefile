# `make demo` and `make test` do all set-up: a .venv with pinned dependencies, the project installed
# in editable mode, then the job. On a host whose python already imports torch (a GPU host), that
# torch is kept and the venv sees it (--system-site-packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements.txt pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already importable by $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m misa_compile.demo

# pytest exits 5 when it collected no test: that is a failure too (make then exits non-zero).
test: $(STAMP)
	@TRITON_INTERPRET=1 $(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no test ran" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV)
