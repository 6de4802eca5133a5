"""The WorldKV connector of the video backend (``--kv-connector worldkv``).

Importing this package registers ``WorldKVConnector`` under the name ``"worldkv"`` (the engine
imports it lazily). The halves: ``WorldKVScheduler`` (ids, poses, pages) and ``WorldKVWorker``
(bank, copies); ``WorldKVMetadata`` is the per-step plan between them.
"""
from worldkv_connector.connector.connector import WorldKVConnector, resolve_config
from worldkv_connector.connector.meta import WorldKVMetadata
from worldkv_connector.connector.scheduler import WorldKVScheduler
from worldkv_connector.connector.worker import WorldKVWorker

__all__ = ["WorldKVConnector", "WorldKVScheduler", "WorldKVWorker", "WorldKVMetadata", "resolve_config"]
