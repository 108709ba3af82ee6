"""Bad inputs on any rank, disagreeing ranks and mis-tiled shards raise the same clear error on
every rank (the group stays usable); a rank that dies or stalls before a collective makes the
others raise within the process group's timeout instead of hanging."""
import queue
import time

import pytest
import torch

from misa_compile import MisaConfig
from misa_compile.distributed import sharded_indexer_topk

from . import rank_tasks
from .cases import ShardedCase, shards_from_cuts
from .rank_pool import free_port, process_context


def _case(world: int, total: int = 20, variant: str = "misa") -> ShardedCase:
    gen = torch.Generator().manual_seed(1)
    q, k, w = (torch.randn(1, 3, 4, 5, generator=gen), torch.randn(1, total, 5, generator=gen),
               torch.randn(1, 3, 4, generator=gen))
    cuts = [total * i // world for i in range(1, world)]
    offsets, sizes = shards_from_cuts(total, cuts, list(range(world)))
    return ShardedCase(q, k, w, 4, MisaConfig(variant=variant, active_heads=2, block_size=4),
                       offsets, sizes)


def _errors_on_every_rank(pool, kwargs) -> list[str]:
    answers = pool.run(rank_tasks.run_sharded, kwargs)
    assert all(a.error for a in answers), [a.error for a in answers]
    messages = [a.error for a in answers]
    assert all(m.startswith("ValueError: sharded_indexer_topk:") for m in messages), messages
    return messages


def _still_works(pool, case: ShardedCase) -> None:
    answers = pool.run(rank_tasks.run_sharded, case.rank_kwargs())
    assert not any(a.error for a in answers), [a.error for a in answers]


@pytest.mark.parametrize("world", [2, 4])
def test_overlapping_shards(rank_pools, world):
    case = _case(world)
    kwargs = case.rank_kwargs()
    kwargs[1]["key_offset"] -= 2
    kwargs[1]["k_local"] = case.k[:, kwargs[1]["key_offset"]:kwargs[1]["key_offset"] + 7]
    messages = _errors_on_every_rank(rank_pools(world), kwargs)
    assert len(set(messages)) == 1
    assert "shards overlap" in messages[0] and "rank 0" in messages[0]
    _still_works(rank_pools(world), case)


def test_keys_held_by_no_rank(rank_pools):
    case = _case(2)
    kwargs = case.rank_kwargs()
    kwargs[1]["k_local"] = kwargs[1]["k_local"][:, :-3]
    messages = _errors_on_every_rank(rank_pools(2), kwargs)
    assert "keys [17, 20) are held by no rank" in messages[0]


@pytest.mark.parametrize("field, value, expected", [
    ("total_keys", 21, "ranks disagree on total_keys (by rank: [20, 21, 20, 20])"),
    ("config", MisaConfig(variant="misa", active_heads=3, block_size=4),
     "config.active_heads (by rank: [2, 3, 2, 2])"),
    ("k_top", 5, "k_top (by rank: [4, 5, 4, 4])"),
    ("causal", False, "causal (by rank: [1, 0, 1, 1])"),
])
def test_ranks_that_disagree(rank_pools, field, value, expected):
    kwargs = _case(4).rank_kwargs()
    kwargs[1][field] = value
    messages = _errors_on_every_rank(rank_pools(4), kwargs)
    assert len(set(messages)) == 1 and expected in messages[0], messages[0]


def test_bad_input_on_one_rank_is_reported_on_every_rank(rank_pools):
    case = _case(4)
    kwargs = case.rank_kwargs()
    kwargs[2]["k_local"] = torch.randn(1, 5, 6)  # D=6 where q has D=5
    messages = _errors_on_every_rank(rank_pools(4), kwargs)
    assert all("inputs rejected on 1 of 4 ranks; rank 2" in m for m in messages)
    assert "k_local has shape (1, 5, 6) but q (1, 3, 4, 5) needs [B=1, T_local, D=5]" in messages[0]
    assert "(this rank)" in messages[2] and "(this rank)" not in messages[0]
    _still_works(rank_pools(4), case)


@pytest.mark.parametrize("change, expected", [
    (dict(key_offset=18), "key_offset=18 + local keys 10 = 28 exceeds total_keys=20"),
    (dict(key_offset=-1), "key_offset=-1; allowed range is [0, 20]"),
    (dict(config=MisaConfig(variant="hisa")), "config.variant='hisa' has no sharded form"),
    (dict(k_top=0), "k_top=0; allowed range is >= 1"),
    (dict(total_keys=2, key_offset=0), "causal=True needs total_keys >= S"),
])
def test_invalid_arguments(rank_pools, change, expected):
    kwargs = _case(2).rank_kwargs()
    if "total_keys" in change:
        kwargs[0]["k_local"] = kwargs[0]["k_local"][:, :2]
        kwargs[1].update(total_keys=2, key_offset=2, k_local=kwargs[1]["k_local"][:, :0])
    kwargs[0].update(change)
    if "config" in change:
        kwargs[1].update(change)
    messages = _errors_on_every_rank(rank_pools(2), kwargs)
    assert expected in messages[0], messages[0]


def test_needs_an_initialised_process_group():
    case = _case(1)
    with pytest.raises(RuntimeError, match="no initialised process group"):
        sharded_indexer_topk(**case.rank_kwargs()[0])


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_failed_rank_gives_an_error_not_a_hang(mode):
    """Rank 1 dies (or stalls) before the first collective: rank 0 raises CollectiveError naming
    the step, at once when the peer's connection drops, else when the 3 s timeout expires."""
    timeout_s, world = 3, 2
    ctx = process_context()
    answers = ctx.Queue()
    case_kwargs = _case(world).rank_kwargs()
    port = free_port()
    procs = [ctx.Process(target=rank_tasks.rank_that_fails_or_calls,
                         args=(rank, world, port, timeout_s, 1, mode, case_kwargs, answers))
             for rank in range(world)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        rank, error_type, message, waited = answers.get(timeout=60)
    except queue.Empty:
        pytest.fail(f"rank 0 neither returned nor raised within 60 s ({mode})")
    finally:
        for proc in procs:
            proc.join(timeout=1 if proc is procs[1] else 10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    assert rank == 0 and error_type == "CollectiveError", (error_type, message)
    assert "'shard agreement' failed on rank 0 of 2" in message
    assert waited < timeout_s + 5 and time.monotonic() - started < 60
    if mode == "stall":
        assert waited >= timeout_s * 0.9
