"""Inductor's analysis of every launched Triton kernel (inductor_writes.py, TTIR for an H100 on
any machine) succeeds and finds the arguments each kernel writes. Inductor orders the kernels of
a traced op and decides which inputs to clone from this analysis: a kernel whose writes it
cannot see (stores in inline asm) could be reordered past its readers, and one it cannot
analyse at all makes it assume every input is written."""
import json
from collections import defaultdict
from pathlib import Path

from .script_rows import script_rows

SCRIPT = Path(__file__).with_name("inductor_writes.py")

# Each kernel's outputs (the union over its variants). Some inputs appear too: the analysis
# marks a pointer written when a store's address depends on data loaded through it
# (candidate_topk places winners by their loaded values; flagged_topk by the scores), which
# costs a copy of that input where it is used later.
WRITES = {
    "block_visibility_kernel": {"out_ptr"},
    "candidate_topk_kernel": {"flag_ptr", "out_idx_ptr", "out_val_ptr", "val_ptr"},
    "checked_paging_kernel": {"flag_ptr", "len_out_ptr", "table_out_ptr"},
    "compact_rows_kernel": {"cand_idx_ptr", "cand_val_ptr", "count_ptr"},
    "flagged_rescore_kernel": {"out_idx_ptr", "out_val_ptr", "scratch_ptr"},
    "flagged_topk_kernel": {"out_idx_ptr", "out_val_ptr", "src_ptr"},
    # (its hidden ids, placed by the mask it reads, are stored in PTX, declared by the
    # tl.store of the moved ids)
    "hidden_tails_kernel": {"idx_ptr", "val_ptr"},
    # FULL writes out; EMIT appends values to out (the candidate values) and ids to cand_idx
    # (in inline asm, declared to the analysis by common.declare_written).
    "index_scores_kernel": {"cand_idx_ptr", "count_ptr", "out_ptr"},
    "poison_rows_kernel": {"ids_ptr", "values_ptr"},
    "pooled_keys_kernel": {"out_ptr"},
    "query_scores_kernel": {"out_ptr"},
    "routed_inputs_kernel": {"fault_ptr", "q_out_ptr", "w_out_ptr"},
    "router_scores_kernel": {"out_ptr"},
    "sample_threshold_kernel": {"lo_ptr"},
}


def test_inductor_sees_what_every_kernel_writes():
    rows = script_rows(SCRIPT, timeout=1800)
    gave_up = [row for row in rows if row["gave_up"]]
    assert not gave_up, json.dumps(gave_up[:3])
    found = defaultdict(set)
    for row in rows:
        found[row["kernel"]].update(row["writes"])
    assert dict(found) == WRITES
    emit = [set(row["writes"]) for row in rows
            if row["kernel"] == "index_scores_kernel" and "count_ptr" in row["writes"]]
    assert emit and all({"cand_idx_ptr", "count_ptr", "out_ptr"} <= writes for writes in emit)
