import torch

from misa_compile.kernels import reference


def test_dense_op_matches_reference_on_one_example():
    torch.manual_seed(0)
    q, k, w = torch.randn(1, 4, 3, 8), torch.randn(1, 20, 8), torch.randn(1, 4, 3)
    values, _ = torch.ops.misa.dense_topk(q, k, w, 5)
    ref_values, _ = reference.dense_topk(q, k, w, 5)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-5)
