import pytest

from .rank_pool import RankPool


@pytest.fixture(scope="session")
def rank_pools():
    """Gloo groups of 2 and 4 processes, started once for the whole session and lazily."""
    pools: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in pools:
            pools[world] = RankPool(world)
        return pools[world]

    yield get
    for pool in pools.values():
        pool.close()
