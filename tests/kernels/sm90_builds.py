"""Builds every Triton kernel variant the GPU launchers launch, for an H100 (sm_90), on a machine
without a GPU: the launchers run on CPU tensors with their GPU configurations (this script must
run without TRITON_INTERPRET), each launch is recorded instead of run, and each recorded kernel
(every config of an autotuned one) is compiled by Triton's NVIDIA backend down to a cubin
(ptxas included). Catches what the CPU interpreter cannot: a kernel that does not build for the
card, or needs more shared memory than an H100 block has (an autotuner skips such a config at
launch, so a tuned launch needs one config that fits). Prints one JSON line per variant (a
variant is built once, and reported for every launch that uses it).

    env -u TRITON_INTERPRET python tests/kernels/sm90_builds.py [--spills]

--spills adds each variant's registers per thread and spill bytes (ptxas -v on its PTX): a
16384-lane in-register top-k spilling shows here without a GPU."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import misa_compile  # noqa: E402,F401
from misa_compile.kernels.triton.launch.dense_topk import dense_topk_op  # noqa: E402
from misa_compile.kernels.triton.launch.hisa_candidates import hisa_candidates_op  # noqa: E402
from misa_compile.kernels.triton.launch.paged_decode_topk import paged_decode_topk_op  # noqa: E402
from misa_compile.kernels.triton.launch.paged_pooled_keys import paged_pooled_keys_op  # noqa: E402
from misa_compile.kernels.triton.launch.rerank_topk import rerank_topk_op  # noqa: E402
from misa_compile.kernels.triton.launch.route_heads import route_heads_op  # noqa: E402
from misa_compile.kernels.triton.launch.routed_topk import routed_topk_op  # noqa: E402
from misa_compile.kernels.triton.selection.candidate_topk import candidate_topk  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# Largest dynamic shared memory of one H100 block (227 KiB).
H100_SHARED_BYTES = 232448
LAUNCHING_MODULES = [
    f"misa_compile.kernels.triton.{name}" for name in (
        "launch.paged_decode_topk", "poison_rows", "scoring.block_visibility",
        "scoring.index_scores",
        "scoring.query_scores", "scoring.routed_inputs", "scoring.router_scores",
        "selection.candidate_topk", "selection.compact_rows", "selection.flagged_topk",
        "selection.hidden_tails", "selection.sample_threshold")]
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "u1", torch.float8_e4m3fn: "fp8e4nv"}


class Recorder:
    """Stands in for wrap_triton: kernel[grid](*args, **kwargs) records instead of launching."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            Recorder.launches.append((self.kernel, args, kwargs))
        return launch


def record_launches() -> list:
    for name in LAUNCHING_MODULES:
        importlib.import_module(name).wrap_triton = Recorder
    # No kernel runs, so outputs stay as allocated: zeros keep the ids that later launches
    # gather by (routed heads) in range.
    torch.empty = torch.zeros
    gen = torch.Generator().manual_seed(0)

    def inputs(batch, queries, keys, heads=64, dtype=torch.bfloat16):
        q = torch.randn(batch, queries, heads, 128, generator=gen).to(dtype)
        k = torch.randn(batch, keys, 128, generator=gen).to(dtype)
        w = torch.randn(batch, queries, heads, generator=gen).to(dtype)
        return q, k, w

    S, T, K = 256, 8192, 2048
    q, k, w = inputs(1, S, T)
    heads = torch.randint(0, 64, (1, S, 8), generator=gen)
    none3 = (None, None, None)
    pos = torch.arange(T)
    visible = pos[None, :] <= (T - S + torch.arange(S))[:, None]
    additive = torch.zeros(S, T, dtype=torch.bfloat16).masked_fill(~visible, -1e30)
    ranges = (torch.zeros(1, S, dtype=torch.int64), (T - S + 1 + torch.arange(S))[None])
    for causal, key_start, key_end, mask in ((True, *none3), (False, *ranges, None),
                                            (False, None, None, visible[None]),
                                            (False, None, None, additive[None])):
        vis = (causal, key_start, key_end, mask)
        dense_topk_op(q, k, w, K, 1.0, *vis)
        route_heads_op(q, k, w, 8, 1024, *vis)
        routed_topk_op(q, k, w, heads, K, 1.0, *vis)
        hisa_candidates_op(q, k, w, 128, 16, *vis)
    candidates = torch.randint(0, T, (1, S, 4096), generator=gen)
    rerank_topk_op(q, k, w, candidates, K, 1.0, True, *none3)
    # Many candidate lists at once (every config of the tuners of prefill chunks), of MISA's
    # width and MISA-hierarchical's.
    for width, k_top in ((4096, K), (16384, 8192)):
        lists = torch.randn(1, 512, width, generator=gen)
        candidate_topk(lists, k_top, T, torch.zeros(1, 512, k_top),
                       torch.zeros(1, 512, k_top, dtype=torch.int64),
                       ids=torch.zeros(1, 512, width, dtype=torch.int32),
                       count=torch.zeros(512, dtype=torch.int32), lo=torch.zeros(512),
                       flags=torch.zeros(512, dtype=torch.int8))
    # The router of GLM-5's 32 heads (top heads selected in the scores kernel, as for 64), and
    # of a head count that is no power of two (scores, then candidate_topk).
    for num_heads in (32, 48):
        route_heads_op(*inputs(1, S, T, heads=num_heads), 8, 1024, True, *none3)
    # Every key row of a short context at once (the direct path), and fp32 / FP8 inputs.
    dense_topk_op(*inputs(1, 64, 3000), K, 1.0, True, *none3)
    dense_topk_op(*inputs(1, S, T, dtype=torch.float32), K, 1.0, True, *none3)
    q8, k8 = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
    q_scale, k_scale = torch.rand(1, S, 64) + 0.5, torch.rand(1, T) + 0.5
    dense_topk_op(q8, k8, w, K, 1.0, True, *none3, q_scale=q_scale, k_scale=k_scale)
    routed_topk_op(q8, k8, w, heads, K, 1.0, True, *none3, q_scale=q_scale, k_scale=k_scale)
    # Decode: one query per sequence, contiguous and paged keys.
    qd, kd, wd = inputs(4, 1, T)
    dense_topk_op(qd, kd, wd, K, 1.0, True, *none3)
    route_heads_op(qd, kd, wd, 8, 1024, True, *none3)
    page = 64
    k_cache = kd.reshape(4 * T // page, page, 128)
    table = torch.arange(4 * T // page, dtype=torch.int32).view(4, T // page)
    lens = torch.full((4,), T, dtype=torch.int32)
    paged_decode_topk_op(qd[:, 0], k_cache, wd[:, 0], table, lens, K, 0, 1024, 1.0)
    paged_decode_topk_op(qd[:, 0], k_cache, wd[:, 0], table, lens, K, 8, 1024, 1.0)
    # Dense and routed decode with FP8 keys and both scales, and routed with GLM-5's 32 heads.
    for active_heads in (0, 8):
        paged_decode_topk_op(qd[:, 0].to(torch.float8_e4m3fn), k_cache.to(torch.float8_e4m3fn),
                             wd[:, 0], table, lens, K, active_heads, 1024, 1.0,
                             torch.rand(4, 64) + 0.5, torch.rand(k_cache.shape[:2]) + 0.5)
    q32, k32, w32 = inputs(4, 1, T, heads=32)
    paged_decode_topk_op(q32[:, 0], k32.reshape(k_cache.shape), w32[:, 0], table, lens, K, 8,
                         1024, 1.0)
    paged_pooled_keys_op(k_cache, table, lens, 1024)
    return Recorder.launches


def scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def variants(kernel, args, kwargs):
    """(jit function, signature, constexprs, attributes, options) of every variant a launch can
    build, specialised as Triton's launcher specialises them (integers equal to 1 become
    constants; pointers and integers divisible by 16 are marked so), since that decides the
    vector width of the loads and so the registers."""
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        kernel = kernel.fn
    else:
        configs = [None]
    named = dict(zip(kernel.arg_names, args), **kwargs)
    options = {key: named.pop(key) for key in ("num_warps", "num_stages") if key in named}
    for config in configs:
        values = dict(named)
        opts = dict(options)
        if config is not None:
            values.update(config.kwargs)
            opts.update(num_warps=config.num_warps, num_stages=config.num_stages)
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(kernel.params):
            value = values[param.name] if param.name in values else param.default
            if param.is_constexpr or (type(value) is int and value == 1
                                      and not param.do_not_specialize):
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
                continue
            if isinstance(value, torch.Tensor):
                signature[param.name] = "*" + DTYPES[value.dtype]
                aligned = value.data_ptr() % 16 == 0
            else:
                signature[param.name] = scalar_type(value)
                aligned = type(value) is int and value % 16 == 0
            if aligned and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        yield kernel, signature, constexprs, attrs, opts


def build(fn, signature, constexprs, attrs, options, spills: bool) -> dict:
    try:
        built = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=H100,
                               options=options)
    except Exception as error:  # reported per variant; the test fails on any
        return dict(ok=False, error=f"{type(error).__name__}: {str(error)[:400]}")
    row = dict(ok=True, shared=built.metadata.shared,
               fits=built.metadata.shared <= H100_SHARED_BYTES)
    if spills:
        row.update(ptxas_usage(built.asm["ptx"]))
    return row


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes of a kernel's PTX for sm_90a, from ptxas -v."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o",
                              os.path.join(folder, "kernel.o")], capture_output=True,
                             text=True).stderr
    numbers = {name: re.search(pattern, log) for name, pattern in (
        ("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"))}
    return {name: int(match.group(1)) for name, match in numbers.items() if match}


def main():
    spills = "--spills" in sys.argv[1:]
    built = {}
    for launch, (kernel, args, kwargs) in enumerate(record_launches()):
        for fn, signature, constexprs, attrs, options in variants(kernel, args, kwargs):
            key = (fn.__name__, json.dumps(signature, sort_keys=True),
                   repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs)),
                   repr(sorted(options.items())))
            if key not in built:
                built[key] = build(fn, signature, constexprs, attrs, options, spills)
            print(json.dumps(dict(kernel=fn.__name__, launch=launch,
                                  tuned=isinstance(kernel, Autotuner), options=options,
                                  constexprs={k: str(v) for k, v in constexprs.items()},
                                  **built[key])), flush=True)


if __name__ == "__main__":
    sys.exit(main())
