# `make demo` and `make test` do all set-up: a .venv with pinned dependencies, the project installed
# in editable mode, then the job. On a host whose python already imports torch (a GPU host), that
# torch is kept and the venv sees it (--system-site-packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-long clean

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

# With CUDA the suite runs on the GPU without Triton's interpreter: tests/gpu run and the
# interpreter-only tests skip, saying so. Without CUDA, as in CI, the Triton kernels run in the
# interpreter. HAS_CUDA=0/1 on the command line overrides the check (read after set-up).
# pytest exits 5 when it collected no test: that is a failure too (make then exits non-zero).
HAS_CUDA ?= $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
test: $(STAMP)
	@if [ "$(HAS_CUDA)" = 1 ]; then \
		echo "make test: CUDA found, running tests/gpu and the suite without TRITON_INTERPRET"; \
		env -u TRITON_INTERPRET $(PY) -m pytest -q -ra; \
	else \
		TRITON_INTERPRET=1 $(PY) -m pytest -q -ra; \
	fi; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no test ran" >&2; fi; exit $$rc

# The generated-program properties with MISA_HYPOTHESIS_EXAMPLES examples per property instead of
# CI's fixed budget (docs/graph-pass.md, "Properties").
MISA_HYPOTHESIS_EXAMPLES ?= 200
PROPERTY_TESTS := tests/passes/test_graph_properties.py tests/passes/test_spellings.py
# tests/conftest.py sets TRITON_INTERPRET on hosts without CUDA.
test-long: $(STAMP)
	MISA_HYPOTHESIS_EXAMPLES=$(MISA_HYPOTHESIS_EXAMPLES) $(PY) -m pytest -q -ra $(PROPERTY_TESTS)

clean:
	rm -rf $(VENV)
