"""The store path's per-layer plan (``StorePath._layer_plan``): one (K, V, kept ids) fragment per
chunk into its bank slot, the bank side read from the rows planned at ``begin_step``; checked
against the bank's own views for the whole batch and for a batch some of whose stores failed."""
import torch

from worldkv_connector.config import WorldKVConfig
from worldkv_connector.connector.meta import StoreSpec, WorldKVMetadata
from worldkv_connector.connector.worker import WorldKVWorker
from worldkv_connector.shapes import PRESETS

SHAPE = PRESETS["tiny"]  # 2 layers, 2 kv heads x 16, 16 tokens per frame, fp32
L, H, D, T, PS = SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, SHAPE.chunk_tokens, 16


def _worker_with_step(chunks: int) -> WorldKVWorker:
    worker = WorldKVWorker(WorldKVConfig(page_size=PS, bank_bytes=1 << 22, keep_ratio=1.0), SHAPE, page_size=PS,
                           device="cpu")
    worker.register_kv_caches({f"blocks.{i}": torch.zeros(2, 64, PS, H, D) for i in range(L)})
    pages = T // PS
    specs = [StoreSpec(("s", c), tuple(range(c * pages, (c + 1) * pages)), T) for c in range(chunks)]
    worker.bind(WorldKVMetadata(0, stores=specs))
    worker.start_load_kv()
    return worker


def _expected(worker, live, layer, k, v, ids):
    src, dst, sizes = [], [], []
    for j, i in enumerate(live):
        key = worker.stores._step[i].spec.key
        view, idx = worker.bank.view(key), worker.bank.get(key).indices
        for f, (s, d) in enumerate(((k[j], view[layer, 0]), (v[j], view[layer, 1]), (ids[j], idx[layer]))):
            src.append(s.data_ptr())
            dst.append(d.data_ptr())
            sizes.append(s.numel() * s.element_size())
    return src, dst, sizes


def test_store_layer_plan_matches_the_bank_views_for_all_and_for_surviving_stores():
    worker = _worker_with_step(3)
    for live in ([0, 1, 2], [0, 2], [1]):
        b = len(live)
        k, v = torch.randn(b, T, H, D), torch.randn(b, T, H, D)
        ids = torch.arange(T).expand(b, T).contiguous()
        for layer in range(L):
            plan = worker.stores._layer_plan(layer, live, k, v, ids)
            src, dst, sizes = _expected(worker, live, layer, k, v, ids)
            assert plan.src.tolist() == src and plan.dst.tolist() == dst and plan.sizes.tolist() == sizes
            assert plan.nbytes == sum(sizes) and plan.num_fragments == 3 * b
            # the store indices name the storage holding each side
            assert [plan.storages[i][0] for i in plan.src_store.tolist()] == \
                [t.untyped_storage().data_ptr() for j in range(b) for t in (k, v, ids)]
    worker.close()
