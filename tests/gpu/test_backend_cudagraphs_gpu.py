"""CUDA graphs through the misa backend: torch.compile(..., backend="misa", mode="reduce-overhead")
(and its options equivalent, {"triton.cudagraphs": True, ...}, which can carry MisaConfig fields)
records the rewritten graphs into CUDA graphs and replays them on new inputs.

Each compiled model runs on several inputs of one shape, so its graphs are recorded and then
replayed; every call is compared with the same model compiled without CUDA graphs and with eager.
A silent fallback fails the test: Inductor counts every graph it compiled without CUDA graphs
(counters["inductor"]["cudagraph_skips"], e.g. a CPU tensor or a mutated input in the graph), and
the CUDA-graph tree must hold recorded graphs that further calls replay rather than re-record."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import misa_compile.backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parents[2]
CALLS = 4  # warm-up, record, then replays


def recorded_graphs() -> int:
    """CUDA graphs in this device's CUDA-graph tree (Inductor's cudagraph_trees)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(),
                                          create_if_none_exists=False)
    if manager is None:
        return 0
    pending = [node for nodes in manager.roots.values() for node in nodes]
    count = 0
    while pending:
        node = pending.pop()
        count += 1
        pending.extend(child for children in node.children.values() for child in children)
    return count


def run_each(compiled, batches, read) -> list[torch.Tensor]:
    """`read(compiled(*batch))` for each batch, cloned: a CUDA graph's outputs live in its memory
    pool and the next replay overwrites them."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            torch.compiler.cudagraph_mark_step_begin()
            outputs.append(read(compiled(*batch)).clone())
    return outputs


def assert_ran_with_cuda_graphs(compiled, batch, read) -> None:
    """No graph was compiled without CUDA graphs, some were recorded, and one more call replays
    them (the tree does not grow)."""
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    recorded = recorded_graphs()
    assert recorded > 0, "no CUDA graph was recorded"
    run_each(compiled, [batch], read)
    assert recorded_graphs() == recorded, "a further call recorded new graphs"


# ------------------------------------------------------------- the tiny DeepSeek-V3.2 model

def test_tiny_deepseek_reduce_overhead_equals_plain_compile_and_eager():
    from misa_compile.models.deepseek_v32_tiny import tiny_deepseek_v32

    # The default MisaConfig routes 8 heads: all of this model's 8, so the rewritten model
    # computes what the original one does. batched_mm experts: static shapes, no data-dependent
    # expert loop in the graph.
    model, _ = tiny_deepseek_v32(layers=2, index_heads=8, index_topk=8, sequence_length=32,
                                 experts_implementation="batched_mm")
    model = model.cuda()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 96, (1, 32), generator=generator).cuda(),)
               for _ in range(CALLS)]

    def logits(output):
        return output.logits

    counters.clear()
    graphs = torch.compile(model, backend="misa", mode="reduce-overhead")
    got = run_each(graphs, batches, logits)
    report = misa_compile.backend.last_report()
    assert len(report.rewritten) == 2, str(report)
    assert_ran_with_cuda_graphs(graphs, batches[0], logits)

    torch._dynamo.reset()
    want = run_each(torch.compile(model, backend="misa"), batches, logits)
    eager = run_each(model, batches, logits)
    for call, (a, b, c) in enumerate(zip(got, want, eager)):
        # The same Inductor kernels, replayed: equal up to cuBLAS picking another algorithm
        # under capture.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"call {call}")
        # Eager's ATen kernels reorder fp32 sums (norms, softmax, the index score).
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=f"call {call}")


# ------------------------------------------- a production-size DeepSeek-V3.2 indexer (prefill)

LENGTH = 3072  # > index_topk = 2048: queries 2048.. really choose


@pytest.fixture(scope="module")
def production_indexer():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import hf_indexers
        from workloads import true_scores
    finally:
        sys.path.remove(str(ROOT / "bench"))
    device = torch.device("cuda")
    module = hf_indexers.build_indexer_prefill(hf_indexers.DEEPSEEK_V32, smoke=False,
                                               device=device, dtype=torch.bfloat16, seed=0)
    batches = [hf_indexers.decoder_inputs(module.config, LENGTH, device, torch.bfloat16,
                                          seed=seed) for seed in range(1, CALLS + 1)]
    return module, batches, true_scores


def exact_scores(module, batch, indices, true_scores) -> torch.Tensor:
    """fp32 index scores of the selected keys [1, S, k] (-inf where causality hides the key), on
    the q/k/w eager computes."""
    q, k, w = module.scored_inputs(*batch)
    scores = true_scores(q, k, w, indices, module.indexer.softmax_scale, chunk=512)
    positions = torch.arange(LENGTH, device=indices.device)
    return scores.masked_fill(indices.long() > positions[None, :, None], float("-inf"))


def assert_same_selections(module, batches, got, want, true_scores, label: str) -> None:
    """Per query that sees more than k_top keys, the sorted scores of the selected keys agree
    (1e-4 of the row's largest score: fp32 sums in another order; keys tied at the k-th place
    may be swapped)."""
    informative = torch.arange(LENGTH, device=got[0].device) + 1 > module.config.index_topk
    with torch.no_grad():
        for call, (batch, a, b) in enumerate(zip(batches, got, want)):
            x = exact_scores(module, batch, a, true_scores).sort(-1).values
            y = exact_scores(module, batch, b, true_scores).sort(-1).values
            largest = torch.maximum(x.masked_fill(~torch.isfinite(x), 0).abs().amax(-1, True),
                                    y.masked_fill(~torch.isfinite(y), 0).abs().amax(-1, True))
            close = (x == y) | ((x - y).abs() <= 1e-4 * largest)
            differing = int((~close.all(-1))[:, informative].sum())
            assert differing == 0, f"{label}, call {call}: {differing} queries select other keys"


def test_production_indexer_reduce_overhead_equals_plain_compile(production_indexer):
    module, batches, true_scores = production_indexer

    def indices(output):
        return output

    counters.clear()
    graphs = torch.compile(module, backend="misa", mode="reduce-overhead")
    got = run_each(graphs, batches, indices)
    report = misa_compile.backend.last_report()
    assert len(report.rewritten) == 1, str(report)
    assert_ran_with_cuda_graphs(graphs, batches[0], indices)

    torch._dynamo.reset()
    want = run_each(torch.compile(module, backend="misa"), batches, indices)
    assert_same_selections(module, batches, got, want, true_scores,
                           "reduce-overhead vs no CUDA graphs")


def test_production_indexer_with_all_heads_in_cuda_graphs_selects_what_eager_selects(
        production_indexer):
    module, batches, true_scores = production_indexer
    heads = module.config.index_n_heads

    def indices(output):
        return output

    counters.clear()
    # torch.compile takes mode or options, not both: the options carry the cudagraphs switch
    # (what mode="reduce-overhead" sets) and the MisaConfig fields.
    graphs = torch.compile(module, backend="misa",
                           options={"triton.cudagraphs": True, "active_heads": heads})
    # Inductor computes the indexer's prologue (projections, norm, rotary) in fp32 where eager
    # rounds to bf16 between ops, which moves q and k and so the selection (710 of 1024 queries
    # at this size); emulating eager's roundings makes the indexer's inputs eager's.
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = run_each(graphs, batches, indices)
    report = misa_compile.backend.last_report()
    assert len(report.rewritten) == 1, str(report)
    assert_ran_with_cuda_graphs(graphs, batches[0], indices)

    eager = run_each(module, batches, indices)
    assert_same_selections(module, batches, got, eager, true_scores, "all heads vs eager")
