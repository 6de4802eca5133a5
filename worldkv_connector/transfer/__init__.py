"""Transfer engine: every bank <-> page copy is a job on a pooled stream (see ``engine``); each job
picks its copy path (batched DMA, SM copy kernel, copy loop) from its run sizes (see ``paths``).
A step's page copies are planned once as address arrays (``plan_layer_copies``) and sent as one
job per layer (``TransferEngine.submit_layers``)."""
from worldkv_connector.transfer.engine import KINDS, TransferEngine, TransferJob
from worldkv_connector.transfer.fragments import FragmentPlan, plan_fragments
from worldkv_connector.transfer.layer_plan import LayerPlans, PagePools, page_fragments, page_lens_of, plan_layer_copies
from worldkv_connector.transfer.paths import PATHS, PathOptions, choose_path
from worldkv_connector.transfer.runs import merge_runs

__all__ = [
    "TransferEngine", "TransferJob", "merge_runs", "choose_path", "PathOptions", "KINDS", "PATHS",
    "FragmentPlan", "page_fragments", "plan_fragments", "LayerPlans", "PagePools", "plan_layer_copies", "page_lens_of",
]
