"""Transfer engine: every bank <-> page copy is a job on a pooled stream (see ``engine``)."""
from worldkv_connector.transfer.engine import KINDS, PATHS, TransferEngine, TransferJob
from worldkv_connector.transfer.runs import merge_runs

__all__ = ["TransferEngine", "TransferJob", "merge_runs", "KINDS", "PATHS"]
