"""End-to-end benchmark of what a user of `torch.compile(model, backend="misa")` gets on one card.

transformers' own DSA indexer modules, DeepSeek-V3.2's DeepseekV32Indexer and GLM-5's
GlmMoeDsaIndexer, built at production size from their configs with seeded random bf16 weights,
run as in the model's batch-1 causal prefill (bench/hf_indexers.py: transformers' own causal mask
for sdpa, the rotary embeddings of the model's rotary module, the decoder layer's inputs). Rows:

  eager, inductor        the module as written, eager and torch.compile (Inductor)
  inductor chunked       the same math over 256-query chunks, compiled (bench/workloads.py); run
                         only where the module's own Inductor run did not fit
  misa <variant>         torch.compile(module, backend="misa", options=...): dense, misa (h routed
                         heads), misa_hier
  chain <variant>        the prologue, then misa_compile.indexer_topk(q, k, w, causal=True): the op
                         chain the pass emits, called directly on the same q/k/w
  prologue               the q/k/w computation alone (projections, k LayerNorm, rope), Inductor

then a short DeepseekV32ForCausalLM prefill (production-sized but for its depth), Inductor vs
misa h=8.

    python bench/bench_model.py [--lengths 4096,8192,16384,32768,65536] [--glm-lengths 32768]
        [--model-lengths 8192] [--variants dense,misa,misa_hier] [--baselines eager,inductor]
        [--budget-s SECONDS] [--emulate-precision-casts] [--out docs/results/bench_model.json]
    python bench/bench_model.py --smoke --out /tmp/bench_model.json   # tiny sizes, CPU or CUDA

Columns: ms (median after warm-up: CUDA events / triton.testing.do_bench; wall clock on CPU);
speedup vs the module's Inductor run (vs "inductor chunked", marked *, where that did not fit);
ratio vs the direct chain of the same variant (compiled misa rows; the chain's time includes the
prologue); recall of the reference selection (eager's; the dense chain's where eager did not fit),
tie-aware by exact scores, over the queries that see more than index_topk keys; for dense rows the
number of such queries whose selected score set differs from Inductor's; peak extra memory of one
call; what each misa op ran (Triton kernels or the torch implementation, counted with the
profiler); seconds of the first call (compilation). A row that runs out of memory reads OOM, and
the same row is not tried at longer lengths. Prints one table last and writes the JSON to --out
after every length."""
from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch._dynamo
import torch._inductor.config
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import misa_compile
from misa_compile.config import MisaConfig
from misa_compile.eval.metrics import selection_quality
from misa_compile.backend import clear_reports, compiled_reports
from misa_compile.kernels.triton.kernel_names import project_triton_kernel_names
from misa_compile.measure import _native_stderr_silenced, cpu_peak_bytes
from hf_indexers import (DEEPSEEK_V32, GLM_MOE_DSA, IndexerFamily, IndexerPrefill,
                         build_indexer_prefill, build_short_deepseek, decoder_inputs, describe,
                         prefill_logits, transformers_version)
from workloads import hf_indexer_topk, true_scores

VARIANTS = ("dense", "misa", "misa_hier")
BASELINES = ("eager", "inductor")
# Two selections are the same where their exact score sets agree within this fraction of the
# row's largest score: fp32 sums in another order differ by about 1e-6 of it.
SCORE_RTOL = 1e-5
QUALITY_CHUNK = 4096     # queries per step when comparing selections (bounds the [chunk, T] sets)


# A row not started because --budget-s ran out (the table is still printed and written).
OUT_OF_TIME = "skipped: --budget-s spent"


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    active_heads: int
    block_size: int
    candidates: int
    seed: int = 0
    deadline: Optional[float] = None   # time.perf_counter() after which no row starts

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def config(self, variant: str) -> MisaConfig:
        return MisaConfig(variant=variant, active_heads=self.active_heads,
                          block_size=self.block_size, candidates=self.candidates)

    def variant_label(self, variant: str) -> str:
        return {"dense": "dense", "misa": f"misa h={self.active_heads}",
                "misa_hier": f"misa_hier h={self.active_heads}"}[variant]

    def row_name(self, kind: str, variant: str) -> str:
        """kind "misa" (compiled by the misa backend) or "chain" (the direct op chain)."""
        return f"{kind}:{self.variant_label(variant)}"


def make_settings(smoke: bool) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if smoke:
        # float32: eager and compiled code then round alike, so the dense rows must agree exactly.
        return Settings(device, torch.float32, True, active_heads=2, block_size=16, candidates=32)
    return Settings(device, torch.bfloat16, False, active_heads=8, block_size=1024,
                    candidates=8192)


# ----------------------------------------------------------------------------- measuring a call

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(call: Callable[[], Any], device: torch.device) -> float:
    """Median ms of `call`, already warmed up. CUDA: one call timed with events; calls over 100 ms
    are timed twice more, shorter ones with triton.testing.do_bench. CPU: 5 wall-clock runs."""
    if device.type != "cuda":
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)
    import triton.testing

    first = _cuda_event_ms(call)
    if first > 100:
        return statistics.median([first, _cuda_event_ms(call), _cuda_event_ms(call)])
    return triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median")


def _cuda_event_ms(call) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def peak_extra_bytes(call: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """(memory one call needs beyond what exists before it, the call's output)."""
    if device.type != "cuda":
        return cpu_peak_bytes(call), call()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    output = call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, output


def is_out_of_memory(error: BaseException) -> bool:
    """Also true for compiler errors raised because something inside ran out of memory."""
    while error is not None:
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------- which implementation each misa op ran

@functools.lru_cache(maxsize=None)
def our_triton_kernels() -> frozenset:
    """Names of the project's Triton kernels (what the profiler calls their launches); empty
    without CUDA, where the ops never launch them."""
    return (project_triton_kernel_names() if torch.cuda.is_available() else frozenset())


def misa_op_implementations(call: Callable[[], Any], device: torch.device) -> dict:
    """Profiles one call. Returns {"misa_ops": {op: {impl: calls}}, "triton_launches": n} where
    impl is "triton" when the op's call launched one of the project's Triton kernels, "torch"
    when it ran only other kernels (the chunked torch implementation), "unlinked" when the
    profiler tied no kernel to it, "cpu" on the CPU; n counts the launches of the project's
    Triton kernels by kernel name, whoever launched them."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        call()
        synchronize(device)
    ours = our_triton_kernels()
    events = prof.events()
    ops: dict[str, dict[str, int]] = {}
    for event in events:
        if event.name.startswith("misa::") and event.device_type == DeviceType.CPU:
            impl = _implementation(event, ours, device)
            op = event.name.split("::", 1)[1]
            ops.setdefault(op, {}).setdefault(impl, 0)
            ops[op][impl] += 1
    launches = sum(1 for e in events if e.device_type == DeviceType.CUDA and e.name in ours)
    return dict(misa_ops=ops, triton_launches=launches)


def _implementation(event, ours: frozenset, device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    kernels, stack = set(), [event]
    while stack:
        node = stack.pop()
        kernels.update(k.name for k in getattr(node, "kernels", ()))
        stack.extend(node.cpu_children)
    if not kernels:
        return "unlinked"
    return "triton" if kernels & ours else "torch"


def site_summary(reports) -> dict:
    """What the misa backend's pass did to the graphs compiled by this row (nothing for other
    backends): sites rewritten, and the reason codes of those refused."""
    sites = [site for report in reports for site in report.sites]
    if not sites:
        return {}
    rewritten = [s for s in sites if s.status == "rewritten"]
    # visibility / runs: what the pass passes the ops and where it expects them to run.
    return dict(sites_rewritten=len(rewritten),
                sites_refused=[s.reason for s in sites if s.status == "refused"],
                site_masks=sorted({s.mask for s in rewritten}),
                site_visibility=sorted({getattr(s, "visibility", "") for s in rewritten}),
                site_runs=sorted({getattr(s, "runs", "") for s in rewritten}))


def implementation_summary(row: dict) -> str:
    """E.g. "route_heads triton, routed_topk torch"; the visibility the pass gave the ops; the
    refused sites' reasons; the launches of the project's Triton kernels (also those Inductor
    would launch itself, outside any misa op)."""
    parts = [f"{op} {'+'.join(sorted(impls))}" for op, impls in row["misa_ops"].items()]
    if any(row.get("site_visibility", ())):
        parts.append("visibility " + "/".join(row["site_visibility"]))
    if row.get("sites_refused"):
        parts.append("refused: " + ",".join(row["sites_refused"]))
    if row["triton_launches"]:
        parts.append(f"{row['triton_launches']} misa Triton launches")
    return ", ".join(parts) or "-"


# --------------------------------------------------------------------- comparing two selections

@dataclass
class Reference:
    """The selection every row is compared with, by exact scores."""

    source: str
    scores: torch.Tensor          # [B, S, k] exact fp32 scores, -inf for keys the query cannot see
    informative: torch.Tensor     # [S] bool: the query sees more than k_top keys


class ExactScorer:
    """Exact fp32 index scores of selected keys, on the q/k/w that eager computes."""

    def __init__(self, q, k, w, scale: float, k_top: int):
        self.q, self.k, self.w, self.scale, self.k_top = q, k, w, scale, k_top
        self.positions = torch.arange(q.shape[1], device=q.device)

    def scores(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, S, k] scores of `indices`; -inf where causal prefill hides the key (query i sees
        keys 0..i), whatever an implementation put in rows with fewer than k visible keys."""
        # 512 queries per step: a [512, k, D] fp32 gather of keys (512 MiB at k=2048, D=128).
        scores = true_scores(self.q, self.k, self.w, indices, self.scale, chunk=512)
        hidden = indices.long() > self.positions[None, :, None]
        return scores.masked_fill(hidden, float("-inf"))

    def informative(self) -> torch.Tensor:
        return self.positions + 1 > self.k_top


def tie_aware_recall(scores: torch.Tensor, reference: Reference) -> float:
    """Mean over informative queries of |selected keys scoring at least the reference's k-th
    score (within SCORE_RTOL)| / |reference|, capped at 1: a key tied with the reference's last
    one is as right as the one the reference kept."""
    ref = reference.scores
    finite = torch.isfinite(ref)
    threshold = ref.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
    tolerance = SCORE_RTOL * _largest_magnitude(ref)
    size = finite.sum(-1)
    hits = (scores >= threshold - tolerance).sum(-1).minimum(size)
    recall = hits.double() / size.clamp_min(1)
    return float(recall[:, reference.informative].mean())


def _largest_magnitude(scores: torch.Tensor) -> torch.Tensor:
    """Per query, the largest |finite score| ([..., 1])."""
    return scores.masked_fill(~torch.isfinite(scores), 0).abs().amax(-1, keepdim=True)


def index_quality(scores: torch.Tensor, indices: torch.Tensor, reference: Reference,
                  reference_indices: torch.Tensor) -> dict:
    """misa_compile.eval.metrics' recall and IoU of the index sets (ties count as misses), over
    query chunks to bound memory."""
    queries = scores.shape[1]
    visible = torch.arange(1, queries + 1, device=scores.device)[None]
    weighted_recall = weighted_iou = 0.0
    counted, worst = 0, 1.0
    for start in range(0, queries, QUALITY_CHUNK):
        rows = slice(start, start + QUALITY_CHUNK)
        quality = selection_quality((scores[:, rows], indices[:, rows]),
                                    (reference.scores[:, rows], reference_indices[:, rows]),
                                    visible[:, rows], reference.scores.shape[-1])
        if quality.queries:
            weighted_recall += quality.recall * quality.queries
            weighted_iou += quality.iou * quality.queries
            counted += quality.queries
            worst = min(worst, quality.recall_min)
    if not counted:
        return dict(recall_by_index=None, iou=None, recall_min_by_index=None)
    return dict(recall_by_index=weighted_recall / counted, iou=weighted_iou / counted,
                recall_min_by_index=worst)


def mismatching_queries(scores: torch.Tensor, other: torch.Tensor, informative: torch.Tensor
                        ) -> int:
    """Informative queries whose sorted selected score sets differ (beyond SCORE_RTOL)."""
    a, b = scores.sort(-1).values, other.sort(-1).values
    tolerance = SCORE_RTOL * torch.maximum(_largest_magnitude(a), _largest_magnitude(b))
    # Equal infinities (both kept a hidden key) are equal; any other gap beyond the tolerance not.
    close = (a == b) | ((a - b).abs() <= tolerance)
    return int((~close.all(-1))[:, informative].sum())


# ------------------------------------------------------------------------ rows of one length

@dataclass(frozen=True)
class RowPlan:
    """One row: how to build its callable (compiling is part of the first call) and how to read
    the top-k indices out of its output (None: the row selects nothing)."""

    name: str
    variant: str                  # "" for baselines and the prologue
    build: Callable[[], Callable[[], Any]]
    indices_of: Optional[Callable[[Any], torch.Tensor]]
    reset_first: bool = True      # torch._dynamo.reset() before building
    # Decides, from the rows measured so far (by name), whether this row runs.
    wanted: Callable[[dict], bool] = lambda done: True


def measure_row(plan: RowPlan, device: torch.device) -> tuple[dict, Any]:
    """Runs one row: first call (compiles), timing, peak memory (whose output is kept), profile."""
    if plan.reset_first:
        torch._dynamo.reset()
    clear_reports()
    try:
        call = plan.build()
        start = time.perf_counter()
        call()
        synchronize(device)
        first_s = time.perf_counter() - start
        sites = site_summary(compiled_reports())
        ms = time_ms(call, device)
        peak, output = peak_extra_bytes(call, device)
        implementations = misa_op_implementations(call, device)
        return dict(status="ok", ms=ms, peak_gib=peak / 2 ** 30, first_call_s=first_s,
                    **sites, **implementations), output
    except Exception as error:  # a failing row is recorded, the run goes on
        status = "OOM" if is_out_of_memory(error) else f"error: {type(error).__name__}: {error}"
        return dict(status=status[:400]), None


def length_plans(module: IndexerPrefill, inputs: tuple, settings: Settings, variants,
                 baselines) -> list[RowPlan]:
    """Rows in execution order: eager and the dense chain first (one of them is the reference),
    the chains right after the one compile of the prologue they share."""
    k_top, scale = module.indexer.index_topk, module.indexer.softmax_scale
    prologue = {}

    def compile_prologue():
        prologue["fn"] = torch.compile(module.scored_inputs)
        return lambda: prologue["fn"](*inputs)

    def chain(variant):
        config = settings.config(variant)

        def build():
            return lambda: misa_compile.indexer_topk(*prologue["fn"](*inputs), k_top, config,
                                                     scale=scale, causal=True)
        return build

    def compiled_module(backend, options=None):
        def build():
            compiled = torch.compile(module, backend=backend, options=options)
            return lambda: compiled(*inputs)
        return build

    def chunked():
        compile_prologue()   # again: the resets since the chains dropped it
        return lambda: hf_indexer_topk(*prologue["fn"](*inputs), k_top, scale, compiled=True)

    def module_inductor_failed(done):
        return done.get("inductor", {}).get("status", "ok") != "ok"

    selection = lambda out: out  # noqa: E731  (the module returns the indices)
    plans = []
    if "eager" in baselines:
        plans.append(RowPlan("eager", "", lambda: lambda: module(*inputs), selection))
    plans.append(RowPlan("prologue", "", compile_prologue, None))
    # The dense chain always runs: it is the reference where eager does not fit.
    for variant in ("dense",) + tuple(v for v in variants if v != "dense"):
        plans.append(RowPlan(settings.row_name("chain", variant), variant, chain(variant),
                             lambda out: out[1], reset_first=False))
    if "inductor" in baselines:
        plans.append(RowPlan("inductor", "", compiled_module("inductor"), selection))
        plans.append(RowPlan("inductor chunked", "", chunked, selection,
                             wanted=module_inductor_failed))
    for variant in variants:
        options = dict(variant=variant, active_heads=settings.active_heads,
                       block_size=settings.block_size, candidates=settings.candidates)
        plans.append(RowPlan(settings.row_name("misa", variant), variant,
                             compiled_module("misa", options), selection))
    return plans


def bench_length(family: IndexerFamily, module: IndexerPrefill, length: int, settings: Settings,
                 variants, baselines, too_big: dict) -> list[dict]:
    """All rows of one family at one length. too_big maps (family, row) to the length where that
    row ran out of memory: it is not tried again at longer lengths."""
    inputs = decoder_inputs(module.config, length, settings.device, settings.dtype, settings.seed)
    scorer = ExactScorer(*module.scored_inputs(*inputs), module.indexer.softmax_scale,
                         module.indexer.index_topk)
    reference: Optional[Reference] = None
    reference_indices = None
    dense_scores: dict[str, torch.Tensor] = {}   # dense rows and Inductor's, for the check
    rows: dict[str, dict] = {}
    for plan in length_plans(module, inputs, settings, variants, baselines):
        if not plan.wanted(rows):
            continue
        row = dict(family=family.label, length=length, row=plan.name, variant=plan.variant)
        key = (family.label, plan.name)
        if key in too_big:
            row["status"] = f"skipped: OOM at {too_big[key]}"
        elif settings.out_of_time():
            row["status"] = OUT_OF_TIME
        else:
            measured, output = measure_row(plan, settings.device)
            row.update(measured)
            if measured["status"] == "OOM":
                too_big[key] = length
            if output is not None and plan.indices_of is not None:
                indices = plan.indices_of(output)
                scores = scorer.scores(indices)
                if reference is None and plan.name in ("eager", "chain:dense"):
                    reference = Reference(plan.name, scores, scorer.informative())
                    reference_indices = indices
                if reference is not None:
                    row.update(reference=reference.source,
                               recall=tie_aware_recall(scores, reference),
                               **index_quality(scores, indices, reference, reference_indices))
                if plan.variant == "dense" or plan.name.startswith("inductor"):
                    dense_scores[plan.name] = scores
            del output
        rows[plan.name] = row
        release_memory(settings.device)
        print(json.dumps(row), flush=True)
    check_dense_rows(rows, dense_scores, scorer.informative())
    add_ratios(rows)
    return list(rows.values())


def check_dense_rows(rows: dict, dense_scores: dict, informative: torch.Tensor) -> None:
    """The dense rows must select what Inductor selects: counts the informative queries whose
    score sets differ, against the module's Inductor run, else the chunked one."""
    baseline = next((name for name in ("inductor", "inductor chunked") if name in dense_scores),
                    None)
    for name, scores in dense_scores.items():
        if baseline is None or name.startswith("inductor"):
            continue
        rows[name]["dense_vs"] = baseline
        rows[name]["dense_mismatching_queries"] = mismatching_queries(
            scores, dense_scores[baseline], informative)


def add_ratios(rows: dict) -> None:
    """Speedup vs Inductor (the module's run, else the chunked one) and, for compiled misa rows,
    time over the direct chain of the same variant."""
    ok = {name: row for name, row in rows.items() if row["status"] == "ok"}
    baseline = next((name for name in ("inductor", "inductor chunked") if name in ok), None)
    for name, row in ok.items():
        if baseline is not None and name != "prologue":
            row["vs_inductor"] = ok[baseline]["ms"] / row["ms"]
            row["vs_inductor_base"] = baseline
        chain = ok.get(name.replace("misa:", "chain:", 1)) if name.startswith("misa:") else None
        if chain is not None:
            row["vs_chain"] = row["ms"] / chain["ms"]


# ------------------------------------------------------------------------- whole-model rows

def bench_model(lengths, layers: int, settings: Settings, module_rows: list[dict],
                too_big: dict) -> tuple[list[dict], str]:
    """Prefill of a short DeepseekV32ForCausalLM, Inductor vs misa (h routed heads); returns the
    rows and what was shrunk. A row that ran out of memory is not tried at longer lengths."""
    short = build_short_deepseek(layers, settings.smoke, settings.device, settings.dtype,
                                 settings.seed)
    options = dict(variant="misa", active_heads=settings.active_heads,
                   block_size=settings.block_size)
    rows = []
    for length in lengths:
        generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
        input_ids = torch.randint(0, short.config.vocab_size, (1, length), generator=generator,
                                  device=settings.device)
        measured = {}
        for name, backend, backend_options in (
                ("inductor", "inductor", None),
                (settings.row_name("misa", "misa"), "misa", options)):
            key = ("DeepseekV32ForCausalLM", name)
            if key in too_big:
                result = dict(status=f"skipped: OOM at {too_big[key]}")
            elif settings.out_of_time():
                result = dict(status=OUT_OF_TIME)
            else:
                plan = RowPlan(name, "", _compiled_prefill(short.model, input_ids, backend,
                                                           backend_options), None)
                result, _ = measure_row(plan, settings.device)
                if result["status"] == "OOM":
                    too_big[key] = length
            measured[name] = dict(model=key[0], layers=layers, length=length, row=name, **result)
            release_memory(settings.device)
            print(json.dumps(measured[name]), flush=True)
        rows += per_layer_figures(measured, layers, module_rows)
    shrunk = short.shrunk
    del short
    release_memory(settings.device)
    return rows, shrunk


def _compiled_prefill(model, input_ids, backend, options):
    def build():
        compiled = torch.compile(model, backend=backend, options=options)
        return lambda: prefill_logits(compiled, input_ids)
    return build


def per_layer_figures(measured: dict, layers: int, module_rows: list[dict]) -> list[dict]:
    """Per-layer time, the speedup vs Inductor, and the indexer's share of a layer: the module
    row of the same length and implementation (which also builds the mask and rotary tables,
    so the share is an upper bound) over the model's time per layer."""
    inductor = measured.get("inductor", {})
    for name, row in measured.items():
        if row["status"] != "ok":
            continue
        row["per_layer_ms"] = row["ms"] / layers
        if inductor.get("status") == "ok":
            row["vs_inductor"] = inductor["ms"] / row["ms"]
            row["saved_per_layer_ms"] = (inductor["ms"] - row["ms"]) / layers
        indexer = next((r for r in module_rows if r["family"] == DEEPSEEK_V32.label
                        and r["length"] == row["length"] and r["row"] == name
                        and r["status"] == "ok"), None)
        if indexer is not None:
            row["indexer_ms"] = indexer["ms"]
            row["indexer_share"] = indexer["ms"] / row["per_layer_ms"]
    return list(measured.values())


# ------------------------------------------------------------------------------- the output

def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    found = dict(python=platform.python_version(), torch=torch.__version__,
                 transformers=transformers_version(), misa_compile=misa_compile.__version__)
    try:
        import triton
        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "not installed"
    return found


def _num(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def indexer_table(rows: list[dict]) -> list[str]:
    lines = ["| model | L | row | ms | vs Inductor | vs chain | recall | dense != Inductor | "
             "peak GiB | misa ops ran | 1st call s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['family']} | {r['length']} | {r['row']} | {r['status'][:60]} "
                         "| | | | | | | |")
            continue
        star = "*" if r.get("vs_inductor_base") == "inductor chunked" else ""
        recall = _num(r.get("recall"), ".4f")
        if r.get("reference") == r["row"]:
            recall = "reference"
        mismatch = ("" if "dense_mismatching_queries" not in r else
                    f"{r['dense_mismatching_queries']}{'*' if r['dense_vs'] != 'inductor' else ''}")
        lines.append(
            f"| {r['family']} | {r['length']} | {r['row']} | {r['ms']:.3f} | "
            f"{_num(r.get('vs_inductor'), '.2f', 'x')}{star} | "
            f"{_num(r.get('vs_chain'), '.2f', 'x')} | {recall} | {mismatch} | {r['peak_gib']:.2f} | "
            f"{implementation_summary(r)} | {r['first_call_s']:.1f} |")
    return lines


def model_table(rows: list[dict]) -> list[str]:
    lines = ["| model | L | row | ms | ms per layer | vs Inductor | saved ms per layer | "
             "indexer share of a layer | peak GiB | misa ops ran |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} x{r['layers']} | {r['length']} | {r['row']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status'][:60]} | | | | | | |")
            continue
        lines.append(
            f"{head} {r['ms']:.2f} | {r['per_layer_ms']:.2f} | "
            f"{_num(r.get('vs_inductor'), '.2f', 'x')} | "
            f"{_num(r.get('saved_per_layer_ms'), '.2f')} | "
            f"{_num(r.get('indexer_share'), '.0%')} | {r['peak_gib']:.2f} | "
            f"{implementation_summary(r)} |")
    return lines


def report(result: dict) -> str:
    s = result["settings"]
    lines = [f"card: {result['card']}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"batch 1 causal prefill, {s['dtype']} weights and activations, seed {s['seed']}; "
             f"misa: h={s['active_heads']} routed heads, router block {s['block_size']}, "
             f"misa_hier re-ranks {s['candidates']} candidates"]
    for label, sizes in result["families"].items():
        lines.append(f"{label}: {json.dumps(sizes)}")
    lines += ["",
              "vs Inductor: the module's Inductor time over the row's (* vs 'inductor chunked', "
              "where the module's Inductor run did not fit). vs chain: compiled misa time over "
              "the direct chain's (prologue + misa_compile.indexer_topk, no mask: causal=True).",
              "recall: of eager's selection ('chain:dense' where eager did not fit), tie-aware "
              f"by exact fp32 scores (rtol {SCORE_RTOL}), over queries seeing more than "
              "index_topk keys. dense != Inductor: such queries whose selected score sets differ "
              "from Inductor's (* the chunked run's).",
              "Rows of the module build transformers' causal mask (sdpa: bool [B,1,S,T]) and the "
              "rotary tables in the timed call, as the model's forward does once for all layers.",
              ""]
    lines += indexer_table(result["rows"])
    if result["model_rows"]:
        lines += ["", f"whole model: {result['model_shrunk']}",
                  "ms per layer: the prefill's time over its layers (embedding, final norm and "
                  "last-position head included). indexer share: the module row of the same L and "
                  "implementation over that (an upper bound: the module row also builds the "
                  "mask)."]
        lines += model_table(result["model_rows"])
    lines.append(f"\ntotal {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main

def parse_lengths(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CPU, or CUDA if present), well under a minute")
    parser.add_argument("--lengths", default=None,
                        help="DeepSeek-V3.2 indexer lengths (default 4096,8192,16384,32768,65536)")
    parser.add_argument("--glm-lengths", default=None,
                        help="GLM-5 indexer lengths (default 32768; '' for none)")
    parser.add_argument("--model-lengths", default=None,
                        help="whole-model prefill lengths (default 8192; '' for none)")
    parser.add_argument("--model-layers", type=int, default=None,
                        help="decoder layers of the whole model, 1 to 3 (default 2; smoke 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"misa variants, compiled and as the direct chain: {VARIANTS}")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"baselines of the module: {BASELINES} ('' for none)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no row after this many seconds; the rest are reported as "
                             "skipped, so a run under a time limit still prints its table")
    parser.add_argument("--emulate-precision-casts", action="store_true",
                        help="every Inductor compile rounds as eager does (Inductor's "
                             "emulate_precision_casts), so that the dense rows' selection can "
                             "equal eager's and Inductor's exactly; off, Inductor's fp32 prologue "
                             "moves q and k a little and with them the selection")
    parser.add_argument("--out", default="docs/results/bench_model.json")
    args = parser.parse_args(argv)
    defaults = (("64", "64", "64") if args.smoke else
                ("4096,8192,16384,32768,65536", "32768", "8192"))
    for name, default in zip(("lengths", "glm_lengths", "model_lengths"), defaults):
        setattr(args, name, parse_lengths(default if getattr(args, name) is None
                                          else getattr(args, name)))
    if args.model_layers is None:
        args.model_layers = 1 if args.smoke else 2
    for name, allowed in (("variants", VARIANTS), ("baselines", BASELINES)):
        chosen = [part.strip() for part in getattr(args, name).split(",") if part.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; allowed {allowed}")
        setattr(args, name, tuple(chosen))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = make_settings(args.smoke)
    if args.budget_s is not None:
        settings = dataclasses.replace(settings, deadline=started + args.budget_s)
    if args.smoke:
        # Tiny graphs: a pool of compile workers costs more to start than it saves.
        torch._inductor.config.compile_threads = 1
    torch._inductor.config.emulate_precision_casts = args.emulate_precision_casts
    result = dict(card=card_name(settings.device), versions=versions(),
                  settings=dict(device=str(settings.device), dtype=str(settings.dtype),
                                smoke=settings.smoke, active_heads=settings.active_heads,
                                block_size=settings.block_size, candidates=settings.candidates,
                                seed=settings.seed,
                                emulate_precision_casts=args.emulate_precision_casts),
                  families={}, rows=[], model_rows=[], model_shrunk=None, elapsed_s=0.0)
    print(f"card: {result['card']}; {json.dumps(result['versions'])}", flush=True)
    out = Path(args.out)
    too_big: dict = {}
    with torch.no_grad():
        for family, lengths in ((DEEPSEEK_V32, args.lengths), (GLM_MOE_DSA, args.glm_lengths)):
            if not lengths:
                continue
            module = build_indexer_prefill(family, settings.smoke, settings.device,
                                           settings.dtype, settings.seed)
            result["families"][family.label] = describe(module.config)
            for length in lengths:
                result["rows"] += bench_length(family, module, length, settings, args.variants,
                                               args.baselines, too_big)
                write_json(result, out, started)
            del module
            release_memory(settings.device)
        if args.model_lengths:
            result["model_rows"], result["model_shrunk"] = bench_model(
                args.model_lengths, args.model_layers, settings, result["rows"], too_big)
    write_json(result, out, started)
    print(report(result), flush=True)
    return result


def write_json(result: dict, out: Path, started: float) -> None:
    result["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
