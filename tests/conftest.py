"""Root test configuration. TRITON_INTERPRET must be set before any Triton kernel module is
imported (Triton reads it when @triton.jit decorates), so it is set here, first, on CPU-only hosts."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402

import misa_compile  # noqa: E402,F401  (registers the misa ops)

# A hypothesis example that silently recompiles past Dynamo's limit falls back to eager and would
# make compile tests vacuous: make that an error instead.
torch._dynamo.config.fail_on_recompile_limit_hit = True


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
