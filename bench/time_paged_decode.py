"""Paged decode at 64 sequences x 64K keys (H = 64, k = 2048, pages of 64): dense and MISA h=8
with cached pooled keys, bf16 and FP8 keys, each timed as a plain call and replayed from a CUDA
graph, with bench_indexer's inputs and helpers. Small enough to run in each revision tree of
bench/revision_trees.sh, so that revisions are compared on one card in one session:

    cd DEST/REV/src && PYTHONPATH=../py:bench python3 bench/time_paged_decode.py out.json

Plain calls are single timed calls (bench_indexer.time_call), so their host part varies from
run to run; the graph replays are GPU time alone."""
from __future__ import annotations

import json
import sys

import torch

import bench_indexer as bi
from workloads import make_inputs, quantize_fp8


def main(out_path: str) -> None:
    q, k, w = make_inputs(64, 1, 65536, 64, seed=0)
    q8, k8, q_scale, k_scale = quantize_fp8(q, k)
    key_sets = {"bf16": bi.paged_inputs(q, k, w),
                "fp8": bi.paged_inputs(q8, k8, w, q_scale, k_scale)}
    rows = {"device": torch.cuda.get_device_name()}
    for keys, inputs in key_sets.items():
        cached = (*inputs, bi.pooled_for(inputs))
        for name, config, args in (("dense", bi.VARIANTS["dense"], inputs),
                                   ("misa cached", bi.VARIANTS["misa"], cached)):
            call = lambda c=config, a=args: bi.paged_call(a, c)
            plain = bi.time_call(call)
            replay, outputs = bi.captured(call)
            graph = bi.time_call(replay)
            values, _ = call()
            # The replay selects what the plain call selects (as sets of values).
            assert torch.equal(values.sort(-1).values, outputs[0].sort(-1).values), name
            rows[f"{name} {keys}"] = dict(plain_ms=round(plain, 4), graph_ms=round(graph, 4))
            print(f"{name} {keys}", rows[f"{name} {keys}"], flush=True)
    with open(out_path, "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
