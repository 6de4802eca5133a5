"""The remote tier: a world bank shared past one process, on Mooncake Store or Redis/Valkey.

``RemoteConfig`` is the connector config's ``remote`` object; ``RemoteTier`` the object a bank holds
(write-through of ready entries, commit records, writer records); ``resume_remote`` brings a
session's committed chunks into a connector (resume a session, or join a shared world).
"""
from worldkv_connector.remote.backends import RemoteBackend, RemoteError, make_backend
from worldkv_connector.remote.config import RemoteConfig
from worldkv_connector.remote.records import ChunkRecord, RemoteWriterError, model_fingerprint
from worldkv_connector.remote.tier import RemoteTier

__all__ = ["RemoteConfig", "RemoteTier", "RemoteBackend", "RemoteError", "RemoteWriterError", "ChunkRecord",
           "make_backend", "model_fingerprint"]
