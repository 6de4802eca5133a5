"""Transfer engine: every bank <-> page copy is a job on a pooled stream (see ``engine``); each job
picks its copy path (batched DMA, SM copy kernel, copy loop) from its run sizes (see ``paths``).
Many page fragments are best planned as address arrays (``page_fragments``) and sent with
``TransferEngine.submit_plan``."""
from worldkv_connector.transfer.engine import KINDS, TransferEngine, TransferJob
from worldkv_connector.transfer.fragments import FragmentPlan, concat_plans, page_fragments, plan_fragments
from worldkv_connector.transfer.paths import PATHS, PathOptions, choose_path
from worldkv_connector.transfer.runs import merge_runs

__all__ = [
    "TransferEngine", "TransferJob", "merge_runs", "choose_path", "PathOptions", "KINDS", "PATHS",
    "FragmentPlan", "page_fragments", "plan_fragments", "concat_plans",
]
