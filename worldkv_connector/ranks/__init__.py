"""Head-sharded ranks (tensor parallel, or Ulysses sequence parallel's head shards): the
collectives the connector's ranks agree through (``RankGroup``: plan broadcast and digest check,
success masks all-reduced by minimum, sums), compression whose statistics are all-reduced so every
rank keeps the same tokens, and the remote tier written and read per rank (``ShardedRemote``)."""
from worldkv_connector.ranks.compression import sharded_compress_chunk, sharded_novelty_scores
from worldkv_connector.ranks.group import PlanDivergenceError, RankGroup, plan_digest
from worldkv_connector.ranks.remote import ShardedRemote

__all__ = ["RankGroup", "PlanDivergenceError", "plan_digest", "sharded_compress_chunk", "sharded_novelty_scores",
           "ShardedRemote"]
