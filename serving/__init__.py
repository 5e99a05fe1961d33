"""Serving RxT: per-conversation STM storage (`serving.store`) for the HTTP server."""

from .store import (
    ConversationExists,
    ConversationNotFound,
    IncompatibleMemory,
    InMemorySTMStore,
    RedisSTMStore,
    SQLiteSTMStore,
    StoredMemory,
    STMStore,
    StoreError,
    VersionConflict,
    model_fingerprint,
    open_store,
)

__all__ = [
    "ConversationExists",
    "ConversationNotFound",
    "IncompatibleMemory",
    "InMemorySTMStore",
    "RedisSTMStore",
    "SQLiteSTMStore",
    "StoredMemory",
    "STMStore",
    "StoreError",
    "VersionConflict",
    "model_fingerprint",
    "open_store",
]
