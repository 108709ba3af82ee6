"""Every form an op's `mask` may take, built from one visibility pattern so that the references
see the same visibility whatever the form: bool or additive (fp32 / fp16 / bf16, hidden entries
filled with -inf or the dtype's finfo.min, visible ones 0 or a small bias that reorders keys),
shaped [B, S, T], a [B, 1, S, T] attention mask sliced [:, 0], [1, S, T], [S, T], or a stride-0
expand of [1, S, T]. Shared by the interpreter tests (tests/kernels) and the GPU tests."""
from __future__ import annotations

import torch

# (dtype, fill of hidden entries, layout): every layout and every dtype x fill appears.
MASK_FORMS = [
    (torch.bool, None, "bst"),
    (torch.bool, None, "b1st"),
    (torch.bool, None, "1st"),
    (torch.bool, None, "st"),
    (torch.bool, None, "expand"),
    (torch.float32, "-inf", "bst"),
    (torch.float32, "min", "1st"),
    (torch.float16, "min", "st"),
    (torch.float16, "-inf", "b1st"),
    (torch.bfloat16, "min", "expand"),
    (torch.bfloat16, "-inf", "bst"),
]
FORM_IDS = [f"{str(d).split('.')[-1]}-{fill or 'bool'}-{layout}" for d, fill, layout in MASK_FORMS]


def make_mask(form, batch: int, queries: int, keys: int, seed: int = 0, keep: float = 0.6,
              device="cpu", base=None) -> torch.Tensor:
    """A mask of `form` hiding about 1 - keep of the keys (and every key that the bool [S, T]
    `base`, e.g. a causal pattern, hides); layouts without a batch dim share one pattern across
    the batch."""
    dtype, fill, layout = form
    gen = torch.Generator().manual_seed(seed)
    rows = batch if layout in ("bst", "b1st") else 1
    visible = torch.rand(rows, queries, keys, generator=gen) < keep
    if base is not None:
        visible &= base.cpu()
    if dtype == torch.bool:
        mask = visible
    else:
        # Visible entries: 0 or a small bias that reorders keys; hidden ones: the fill.
        bias = torch.where(torch.rand(rows, queries, keys, generator=gen) < 0.5, 0.0,
                           torch.randn(rows, queries, keys, generator=gen) * 0.5)
        hidden = float("-inf") if fill == "-inf" else torch.finfo(dtype).min
        mask = torch.where(visible, bias, torch.tensor(hidden)).to(dtype)
    mask = mask.to(device)
    if layout == "b1st":
        # What a transformers model builds, [B, 1, S, T] sliced [:, 0], here cut from a wider
        # buffer so that the rows have a stride other than T.
        wide = torch.zeros(batch, 1, queries, keys + 3, dtype=dtype, device=device)
        wide[..., :keys] = mask[:, None]
        return wide[..., :keys][:, 0]
    if layout == "st":
        return mask[0]
    if layout == "expand":
        return mask.expand(batch, queries, keys)
    return mask
