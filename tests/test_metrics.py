"""Connector metrics: counters, derived ratios, merging and the Prometheus exposition."""
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from worldkv_connector.bank import Bank
from worldkv_connector.metrics import ConnectorMetrics
from worldkv_connector.transfer import TransferEngine


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_counters_from_real_jobs_and_bank():
    m = ConnectorMetrics()
    src, dst = torch.randn(4, 8), torch.zeros(4, 8)
    with TransferEngine() as eng:
        eng.submit("store", [src[0], src[1]], [dst[0], dst[1]])
        eng.submit("load", [dst[0]], [src[3]])
        for job in eng.poll():
            m.record_job(job)
    assert (m.store_jobs, m.load_jobs, m.bytes_stored, m.bytes_loaded) == (1, 1, 64, 32)
    assert m.copy_paths == {"cpu-sync": 2} and m.store_errors == m.load_errors == 0
    bank = Bank(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, slot_tokens=2,
                capacity_bytes=1024, pin=False)
    bank.reserve("a", 2)
    m.set_bank(bank.stats())
    assert (m.bank_bytes, m.bank_entries) == (64, 1)


def test_compression_ratio_and_hit_rate():
    m = ConnectorMetrics()
    assert m.compression_ratio == 1.0 and m.retrieval_hit_rate == 0.0
    m.record_chunk(48, 24)
    m.record_chunk(48, 32)
    assert m.chunks_banked == 2 and m.compression_ratio == pytest.approx(96 / 56)
    m.retrieval_hits, m.retrieval_misses = 3, 1
    assert m.retrieval_hit_rate == 0.75
    with pytest.raises(ValueError, match="tokens_after <= tokens_before"):
        m.record_chunk(10, 11)


def test_errors_counted_per_kind():
    class Job:
        def __init__(self, kind, error):
            self.kind, self.error, self.nbytes, self.path = kind, error, 10, "dma-loop"

    m = ConnectorMetrics()
    m.record_job(Job("load", "RuntimeError: boom"))
    m.record_job(Job("store", None))
    m.record_job(Job("store", "RuntimeError: boom"))
    assert (m.load_errors, m.store_errors, m.copy_paths["dma-loop"]) == (1, 1, 3)
    with pytest.raises(ValueError, match="job.kind='copy'"):
        m.record_job(Job("copy", None))


def test_merge_adds_everything():
    a = ConnectorMetrics(bytes_stored=10, retrieval_hits=1, bank_bytes=100, copy_paths={"dma-batch": 2})
    b = ConnectorMetrics(bytes_stored=5, retrieval_misses=4, bank_bytes=50, copy_paths={"dma-batch": 1, "dma-loop": 3})
    assert a.merge(b) is a
    assert (a.bytes_stored, a.retrieval_hits, a.retrieval_misses, a.bank_bytes) == (15, 1, 4, 150)
    assert a.copy_paths == {"dma-batch": 3, "dma-loop": 3}
    with pytest.raises(TypeError):
        a.merge({"bytes_stored": 1})


def test_as_dict():
    m = ConnectorMetrics(tokens_before_compression=96, tokens_after_compression=48)
    d = m.as_dict()
    assert d["compression_ratio"] == 2.0 and d["bytes_stored"] == 0 and "_registries" not in d
    d["copy_paths"]["x"] = 1
    assert m.copy_paths == {}  # a copy, not the live dict


def test_prometheus_text_parses_and_has_values():
    m = ConnectorMetrics(bytes_stored=4096, load_errors=2, bank_entries=7, copy_paths={"dma-batch": 5})
    m.record_chunk(48, 24)
    text = m.to_prometheus()
    got = samples(text)
    assert got[("worldkv_bytes_stored_total", ())] == 4096
    assert got[("worldkv_load_errors_total", ())] == 2
    assert got[("worldkv_bank_entries", ())] == 7
    assert got[("worldkv_compression_ratio", ())] == 2.0
    assert got[("worldkv_copy_jobs_total", (("path", "dma-batch"),))] == 5
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert all(n.startswith("worldkv_") for n in names)
    # repeated calls do not clash and reflect new values
    m.bytes_stored += 1
    assert samples(m.to_prometheus())[("worldkv_bytes_stored_total", ())] == 4097


def test_prometheus_into_a_server_registry_reads_live_values():
    m = ConnectorMetrics()
    registry = CollectorRegistry()
    m.to_prometheus(registry)
    m.retrieval_hits = 9
    text = m.to_prometheus(registry)  # registered once, not twice
    assert samples(text)[("worldkv_retrieval_hits_total", ())] == 9


def test_bank_peak_is_the_high_water_mark():
    m = ConnectorMetrics()
    for used in (100, 300, 50, 0):
        m.set_bank({"bytes_used": used, "entries": used // 50})
    assert (m.bank_bytes, m.bank_entries, m.bank_peak_bytes) == (0, 0, 300)
    assert m.as_dict()["bank_peak_bytes"] == 300
    assert "worldkv_bank_peak_bytes 300" in m.to_prometheus()
