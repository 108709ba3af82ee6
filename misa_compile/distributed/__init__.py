"""Context parallelism for the indexer: keys sharded across the ranks of a torch.distributed
process group, the global top-k selected without moving keys. See docs/distributed.md."""
from .collectives import CollectiveError, CollectiveTraffic, count_collective_bytes
from .indexer import sharded_indexer_topk
from .launch import init_from_env
from .op import sharded_topk  # registers torch.ops.misa.sharded_topk
from .router import sharded_router_scores
from .shards import SHARDED_VARIANTS, ShardLayout

__all__ = ["CollectiveError", "CollectiveTraffic", "SHARDED_VARIANTS", "ShardLayout",
           "count_collective_bytes", "init_from_env", "sharded_indexer_topk",
           "sharded_router_scores", "sharded_topk"]
