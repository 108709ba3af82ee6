"""Every Triton kernel variant the GPU launchers launch builds for an H100 (sm_90) with Triton's
NVIDIA backend and ptxas, on any machine (sm90_builds.py records the launches of the ops on CPU
tensors and compiles them): a kernel that only the CPU interpreter can run, or that needs more
shared memory than the card has, fails here rather than on the first GPU."""
import json
from pathlib import Path

from .script_rows import script_rows

SCRIPT = Path(__file__).with_name("sm90_builds.py")
# Every kernel the launchers use; the op calls in sm90_builds.py must reach each one.
KERNELS = {"index_scores_kernel", "query_scores_kernel", "router_scores_kernel",
           "pooled_keys_kernel", "block_visibility_kernel", "candidate_topk_kernel",
           "sample_threshold_kernel", "compact_rows_kernel", "flagged_topk_kernel",
           "flagged_rescore_kernel", "hidden_tails_kernel", "checked_paging_kernel",
           "routed_inputs_kernel", "poison_rows_kernel"}


def test_every_launched_kernel_builds_for_an_h100():
    rows = script_rows(SCRIPT, timeout=2400)
    assert {row["kernel"] for row in rows} == KERNELS
    failed = [row for row in rows if not row["ok"]]
    assert not failed, json.dumps(failed[:3], indent=1)
    too_big = [row for row in rows if not row["tuned"] and not row["fits"]]
    assert not too_big, json.dumps(too_big[:3], indent=1)
    tuned = {}
    for row in rows:
        if row["tuned"]:
            tuned.setdefault(row["launch"], []).append(row["fits"])
    assert all(any(fits) for fits in tuned.values()), "a tuned launch with no config that fits"
