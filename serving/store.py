"""Where a serving process keeps each conversation's Short-Term Memory (STM) between requests.

One row per conversation: the STM `[1, layers, slots, dim]` as safetensors bytes (the one STM file format of
`modeling_rxt.format_rxt`, what `save_memory` writes; rows of the store's former `rxt-stm-store/1` format are
still read), a version number, an opaque owner id, timestamps and a few metadata strings. Every write of an
existing conversation is a compare-and-set on the version (`replace(..., expected_version=...)`), so two
requests of the same conversation never silently overwrite each other. A stored state carries the fingerprint,
dtype and shape of the model that wrote it and is refused (`IncompatibleMemory`) by a store built for another
model.

Backends (all with the same semantics, pick one with `open_store(url, ...)`):

- `SQLiteSTMStore` (`sqlite:///path.db`): the embedded default. WAL journal, `synchronous=FULL`,
  each write is one transaction, so a killed process leaves every row at its last committed version.
  Safe to share between threads and between processes on one machine.
- `RedisSTMStore` (`redis://host:port/db`): for several server replicas. One hash per conversation,
  compare-and-set in a Lua script, TTL enforced by Redis `PEXPIRE` (refreshed on every write).
- `InMemorySTMStore` (`memory://`): one process, nothing persisted (tests, demos).

```python
>>> store = open_store("sqlite:///stm.db", model_fingerprint(model), model.config.stm_shape, torch.float32)
>>> row = store.create("conv-1", model.init_memory(1), owner="key-hash")
>>> row = store.replace("conv-1", new_stm, expected_version=row.version)   # VersionConflict if someone was faster
>>> store.get("conv-1").stm_state
```
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from rxt_hf.modeling_rxt.format_rxt import stm_from_bytes, stm_to_bytes

__all__ = [
    "StoreError",
    "ConversationNotFound",
    "ConversationExists",
    "VersionConflict",
    "IncompatibleMemory",
    "StoredMemory",
    "model_fingerprint",
    "STMStore",
    "SQLiteSTMStore",
    "RedisSTMStore",
    "InMemorySTMStore",
    "open_store",
]

_MAX_ID_LENGTH = 256
_MAX_METADATA_BYTES = 64 * 1024

Clock = Callable[[], float]


# ------------------------------------------------------------------------------------------------------
# errors


class StoreError(Exception):
    """Base of every store error. `conversation_id` is set when the error is about one conversation."""

    def __init__(self, message: str, conversation_id: str | None = None):
        super().__init__(message)
        self.conversation_id = conversation_id

    def __str__(self) -> str:  # KeyError would otherwise print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class ConversationNotFound(StoreError, KeyError):
    """No live conversation with this id (never created, deleted, or expired)."""


class ConversationExists(StoreError):
    """`create` of an id that is already stored."""


class VersionConflict(StoreError):
    """Compare-and-set lost: the stored version is not `expected_version` (someone committed first)."""

    def __init__(
        self, message: str, conversation_id: str | None = None, expected_version: int = 0, current_version: int = 0
    ):
        super().__init__(message, conversation_id)
        self.expected_version = expected_version
        self.current_version = current_version


class IncompatibleMemory(StoreError):
    """The stored state was written by another model, or with another dtype / shape, or is unreadable."""

    def __init__(self, message: str, conversation_id: str | None = None, differences: list[str] | None = None):
        super().__init__(message, conversation_id)
        self.differences = differences or []


# ------------------------------------------------------------------------------------------------------
# the stored row


@dataclass(frozen=True, eq=False)
class StoredMemory:
    """One conversation as stored. `eq=False`: rows hold tensors, compare fields explicitly."""

    conversation_id: str
    stm_state: torch.Tensor  # [1, layers, slots, dim], CPU
    version: int  # 1 at create, +1 per committed replace
    owner: str | None  # opaque owner id (the server passes a hash of the API key) or None
    created_at: float
    updated_at: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Row:
    """A row as a backend holds it: the state still serialized."""

    conversation_id: str
    version: int
    owner: str | None
    fingerprint: str
    state: bytes
    metadata: dict[str, str]
    created_at: float
    updated_at: float


# ------------------------------------------------------------------------------------------------------
# model fingerprint

# Config keys that change when a model is saved and reloaded (or say nothing about what it computes).
# The weights' dtypes are hashed with the weights, so `dtype` is not needed from the config.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"})


def model_fingerprint(model) -> str:
    """A sha256 hex digest of `model`'s config and weights: which model an STM state belongs to.

    Two models with the same geometry but different weights get different fingerprints; the same
    model saved and reloaded elsewhere keeps its fingerprint (bookkeeping config keys such as
    `_name_or_path`, `transformers_version`, `auto_map`, `architectures` are left out). Hashes
    every tensor of `state_dict()` (name, dtype, shape, bytes): about 0.1 s for 12M parameters.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(model, "state_dict"):
        raise TypeError(
            f"model_fingerprint(model=...) needs a transformers model with .config and .state_dict(), "
            f"got {type(model).__name__}: pass the RxT model the server generates with."
        )
    config_dict = json.loads(config.to_json_string(use_diff=False))
    stable_config = {
        key: value
        for key, value in config_dict.items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS
    }
    digest = hashlib.sha256()
    digest.update(b"rxt-model-fingerprint/1\n")
    digest.update(json.dumps(stable_config, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name}|{_dtype_name(tensor.dtype)}|{list(tensor.shape)}\n".encode("utf-8"))
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------
# serialization


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(fingerprint: str) -> str:
    return fingerprint[:16] + ("..." if len(fingerprint) > 16 else "")


# ------------------------------------------------------------------------------------------------------
# the interface


class STMStore(ABC):
    """Conversation id -> STM state, versioned, with compare-and-set writes, TTL and delete.

    `fingerprint` (see `model_fingerprint`), `shape` and `dtype` describe the one model this store
    serves: every state written must have exactly that `shape` / `dtype` (else ValueError, nothing
    written), and a stored state whose fingerprint, dtype or shape differs is refused on read
    (`IncompatibleMemory`). `shape` is one conversation's STM: `(layers, slots, dim)` (as
    `config.stm_shape`) or `(1, layers, slots, dim)`; states are always `[1, layers, slots, dim]`.

    `ttl_seconds`: a conversation not updated for that long is expired (TTL counts from
    `updated_at`; reads do not extend it): `get` / `replace` treat it as not found, `count` skips it,
    `evict_expired` deletes it, and `create` may reuse its id. `clock` (keyword only, default
    `time.time`) is the time source, replaceable in tests.

    Thread-safe. Use as a context manager or call `close()`.
    """

    backend = "abstract"
    # Errors of the backend's client library, re-raised as StoreError with `_backend_fix` as the advice.
    _backend_error_types: tuple[type[BaseException], ...] = ()
    _backend_fix = "check the store's backend."

    def __init__(
        self,
        fingerprint: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        ttl_seconds: float | None = None,
        *,
        clock: Clock = time.time,
    ):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(
                f"fingerprint={fingerprint!r} must be a non-empty string: pass model_fingerprint(model)."
            )
        self.fingerprint = fingerprint
        self.shape = self._normalise_shape(shape)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"dtype={dtype!r} must be a torch.dtype (e.g. torch.float32 or torch.bfloat16): "
                "pass the dtype of the model's STM (model.init_memory(1).dtype)."
            )
        self.dtype = dtype
        if ttl_seconds is not None:
            if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)) or not (
                math.isfinite(ttl_seconds) and ttl_seconds > 0
            ):
                raise ValueError(
                    f"ttl_seconds={ttl_seconds!r} must be a positive number of seconds, or None to keep "
                    "conversations until they are deleted."
                )
            ttl_seconds = float(ttl_seconds)
        self.ttl_seconds = ttl_seconds
        if not callable(clock):
            raise ValueError(f"clock={clock!r} must be a callable returning seconds (like time.time).")
        self._clock = clock
        self._closed = False

    @staticmethod
    def _normalise_shape(shape) -> tuple[int, int, int, int]:
        try:
            dims = tuple(int(size) for size in shape)
            valid = all(size == original and size > 0 for size, original in zip(dims, shape))
        except (TypeError, ValueError):
            dims, valid = (), False
        if valid and len(dims) == 3:
            dims = (1, *dims)
        if not valid or len(dims) != 4 or dims[0] != 1:
            raise ValueError(
                f"shape={shape!r} must be one conversation's STM shape: (layers, slots, dim) as in "
                "model.config.stm_shape, or (1, layers, slots, dim), with positive integers."
            )
        return dims  # type: ignore[return-value]

    # -- public API ---------------------------------------------------------------------------------

    def create(
        self,
        conversation_id: str,
        stm_state: torch.Tensor,
        owner: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredMemory:
        """Store a new conversation at version 1. ConversationExists if the id is live."""
        self._ensure_open()
        self._check_id(conversation_id)
        state = self._check_state(stm_state)
        if owner is not None and (not isinstance(owner, str) or not owner or len(owner) > _MAX_ID_LENGTH):
            raise ValueError(
                f"owner={owner!r} must be None or a non-empty string of at most {_MAX_ID_LENGTH} characters "
                "(e.g. a hash of the API key)."
            )
        metadata = self._check_metadata(metadata) or {}
        now = float(self._clock())
        row = _Row(
            conversation_id=conversation_id,
            version=1,
            owner=owner,
            fingerprint=self.fingerprint,
            state=self._encode(state),
            metadata=metadata,
            created_at=now,
            updated_at=now,
        )
        with self._translate_backend_errors("create", conversation_id):
            self._create(row, self._cutoff(now))
        return self._stored(row, state.clone())

    def get(self, conversation_id: str) -> StoredMemory:
        """The conversation's last committed row. ConversationNotFound (also if expired), IncompatibleMemory."""
        self._ensure_open()
        self._check_id(conversation_id)
        with self._translate_backend_errors("get", conversation_id):
            row = self._get(conversation_id)
        if row is None:
            raise self._not_found(conversation_id)
        now = float(self._clock())
        cutoff = self._cutoff(now)
        if cutoff is not None and row.updated_at < cutoff:
            raise self._expired(conversation_id, now - row.updated_at)
        return self._stored(row, self._decode(conversation_id, row.state))

    def replace(
        self,
        conversation_id: str,
        stm_state: torch.Tensor,
        expected_version: int,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredMemory:
        """Atomic compare-and-set: commit `stm_state` only if the stored version is `expected_version`.

        Returns the new row (version `expected_version + 1`). `metadata=None` keeps the stored
        metadata, a dict replaces it whole. Refreshes the TTL. VersionConflict if another writer
        committed first (nothing written), ConversationNotFound, IncompatibleMemory if the stored
        row belongs to another model fingerprint.
        """
        self._ensure_open()
        self._check_id(conversation_id)
        if isinstance(expected_version, bool) or not isinstance(expected_version, int) or expected_version < 1:
            raise ValueError(
                f"expected_version={expected_version!r} must be the positive int version of the row you read "
                f"(store.get({conversation_id!r}).version)."
            )
        state = self._check_state(stm_state)
        metadata = self._check_metadata(metadata)
        now = float(self._clock())
        with self._translate_backend_errors("replace", conversation_id):
            row = self._replace(
                conversation_id, self._encode(state), expected_version, metadata, now, self._cutoff(now)
            )
        return self._stored(row, state.clone())

    def delete(self, conversation_id: str) -> bool:
        """Remove the conversation; True if a stored row was removed, False if there was none."""
        self._ensure_open()
        self._check_id(conversation_id)
        with self._translate_backend_errors("delete", conversation_id):
            return self._delete(conversation_id)

    def evict_expired(self, now: float | None = None) -> int:
        """Delete every conversation not updated for `ttl_seconds` (as of `now`, default the clock).

        Returns how many were removed; 0 when the store has no TTL.
        """
        self._ensure_open()
        if self.ttl_seconds is None:
            return 0
        cutoff = self._cutoff(float(self._clock() if now is None else now))
        with self._translate_backend_errors("evict_expired"):
            return self._evict(cutoff)

    def count(self) -> int:
        """Number of live (stored and not expired) conversations."""
        self._ensure_open()
        with self._translate_backend_errors("count"):
            return self._count(self._cutoff(float(self._clock())))

    def close(self) -> None:
        """Release connections. Idempotent; any later call raises StoreError."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "STMStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._location()}, fingerprint={_short(self.fingerprint)}, "
            f"shape={self.shape}, dtype={_dtype_name(self.dtype)}, ttl_seconds={self.ttl_seconds})"
        )

    # -- backend hooks ------------------------------------------------------------------------------

    @abstractmethod
    def _location(self) -> str:
        """Where the data lives, for messages (never with credentials)."""

    @abstractmethod
    def _create(self, row: _Row, cutoff: float | None) -> None:
        """Insert `row` atomically; an existing row older than `cutoff` may be overwritten.

        Raise `self._exists(id)` if a live row exists.
        """

    @abstractmethod
    def _get(self, conversation_id: str) -> _Row | None:
        """The stored row (expired or not), or None."""

    @abstractmethod
    def _replace(
        self,
        conversation_id: str,
        state: bytes,
        expected_version: int,
        metadata: dict[str, str] | None,
        now: float,
        cutoff: float | None,
    ) -> _Row:
        """Compare-and-set (version and fingerprint) in one atomic step; return the committed row.

        Raise via `self._diagnose_failed_replace(...)` when nothing was written.
        """

    @abstractmethod
    def _delete(self, conversation_id: str) -> bool: ...

    @abstractmethod
    def _evict(self, cutoff: float) -> int: ...

    @abstractmethod
    def _count(self, cutoff: float | None) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...

    # -- shared helpers -----------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self!r} is closed: open a new store (open_store(...)) to keep using it.")

    @contextmanager
    def _translate_backend_errors(self, operation: str, conversation_id: str | None = None) -> Iterator[None]:
        """Re-raise the backend library's errors (database locked, connection lost...) as StoreError."""
        try:
            yield
        except StoreError:
            raise
        except self._backend_error_types as error:
            about = "" if conversation_id is None else f" of conversation {conversation_id!r}"
            raise StoreError(
                f"{operation}{about} failed in {self!r}: {type(error).__name__}: {error}. {self._backend_fix}",
                conversation_id,
            ) from error

    def _cutoff(self, now: float) -> float | None:
        """Rows updated before this time are expired (None: no TTL)."""
        return None if self.ttl_seconds is None else now - self.ttl_seconds

    @staticmethod
    def _check_id(conversation_id: str) -> None:
        if (
            not isinstance(conversation_id, str)
            or not conversation_id
            or len(conversation_id) > _MAX_ID_LENGTH
            or not conversation_id.isprintable()
        ):
            raise ValueError(
                f"conversation_id={conversation_id!r} must be a non-empty printable string of at most "
                f"{_MAX_ID_LENGTH} characters (e.g. a uuid4 hex)."
            )

    def _check_state(self, stm_state: torch.Tensor) -> torch.Tensor:
        """The state as a contiguous CPU tensor, or ValueError naming the mismatch (nothing is written)."""
        if not isinstance(stm_state, torch.Tensor):
            raise ValueError(
                f"stm_state must be a torch.Tensor of shape {list(self.shape)}, got {type(stm_state).__name__}."
            )
        if tuple(stm_state.shape) != self.shape:
            missing_batch = tuple(stm_state.shape) == self.shape[1:]
            hint = " (add the batch dimension: stm_state.unsqueeze(0))" if missing_batch else ""
            raise ValueError(
                f"stm_state has shape {list(stm_state.shape)}, this store holds one conversation's STM of shape "
                f"{list(self.shape)}{hint}: store one conversation (batch 1) of this model."
            )
        if stm_state.dtype != self.dtype:
            raise ValueError(
                f"stm_state has dtype {_dtype_name(stm_state.dtype)}, this store holds {_dtype_name(self.dtype)}: "
                f"convert it (stm_state.to(torch.{_dtype_name(self.dtype)})) or open the store with the model's dtype."
            )
        return stm_state.detach().to("cpu").contiguous()

    @staticmethod
    def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if not isinstance(metadata, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
        ):
            raise ValueError(
                f"metadata={metadata!r} must be a dict of str -> str: convert values with str() "
                "(e.g. {'turns': str(turns)})."
            )
        size = len(json.dumps(dict(metadata)).encode("utf-8"))
        if size > _MAX_METADATA_BYTES:
            raise ValueError(
                f"metadata is {size} bytes as JSON, more than the {_MAX_METADATA_BYTES} allowed: keep only small "
                "strings there (the conversation itself lives in the STM)."
            )
        return dict(metadata)

    def _encode(self, state: torch.Tensor) -> bytes:
        return stm_to_bytes(state, model_fingerprint=self.fingerprint)

    def _decode(self, conversation_id: str, blob: bytes) -> torch.Tensor:
        """The stored tensor, after checking it was written for this store's fingerprint, dtype and shape."""
        fix = (
            f"delete it (store.delete({conversation_id!r})) and start a new conversation, or serve it with the "
            "model that wrote it."
        )
        try:
            tensor, metadata = stm_from_bytes(blob)
        except ValueError as error:
            raise IncompatibleMemory(
                f"conversation {conversation_id!r} holds bytes that are not an STM state of this store "
                f"({error}): {fix}",
                conversation_id,
                [str(error)],
            ) from error
        expected = {
            "model fingerprint": self.fingerprint,
            "dtype": _dtype_name(self.dtype),
            "shape": json.dumps(list(self.shape)),
        }
        found = {
            "model fingerprint": metadata.get("model_fingerprint"),
            "dtype": _dtype_name(tensor.dtype),
            "shape": json.dumps(list(tensor.shape)),
        }
        shown = {"model fingerprint": lambda value: _short(str(value))}
        differences = [
            f"{name}: stored {shown.get(name, str)(found[name])}, this store {shown.get(name, str)(value)}"
            for name, value in expected.items()
            if found[name] != value
        ]
        if differences:
            raise IncompatibleMemory(
                f"conversation {conversation_id!r} holds an STM state written for another model: "
                f"{'; '.join(differences)}. A state from another model is never used: {fix}",
                conversation_id,
                differences,
            )
        return tensor

    def _stored(self, row: _Row, state: torch.Tensor) -> StoredMemory:
        return StoredMemory(
            conversation_id=row.conversation_id,
            stm_state=state,
            version=row.version,
            owner=row.owner,
            created_at=row.created_at,
            updated_at=row.updated_at,
            metadata=dict(row.metadata),
        )

    def _not_found(self, conversation_id: str) -> ConversationNotFound:
        return ConversationNotFound(
            f"conversation {conversation_id!r} is not in {self!r}: check the id, or create() it first.",
            conversation_id,
        )

    def _expired(self, conversation_id: str, idle_seconds: float) -> ConversationNotFound:
        return ConversationNotFound(
            f"conversation {conversation_id!r} expired: not updated for {idle_seconds:.0f} s, longer than "
            f"ttl_seconds={self.ttl_seconds:g}: start a new conversation (or open the store with a longer "
            "ttl_seconds).",
            conversation_id,
        )

    def _exists(self, conversation_id: str) -> ConversationExists:
        return ConversationExists(
            f"conversation {conversation_id!r} already exists: use replace() to update it, delete() it first, "
            "or pick another id.",
            conversation_id,
        )

    def _diagnose_failed_replace(
        self,
        conversation_id: str,
        expected_version: int,
        stored: tuple[int, str, float] | None,
        cutoff: float | None,
        now: float,
    ) -> StoreError:
        """Why a compare-and-set wrote nothing, from the stored (version, fingerprint, updated_at)."""
        if stored is None:
            return self._not_found(conversation_id)
        version, fingerprint, updated_at = stored
        if cutoff is not None and updated_at < cutoff:
            return self._expired(conversation_id, now - updated_at)
        if fingerprint != self.fingerprint:
            return IncompatibleMemory(
                f"conversation {conversation_id!r} belongs to model fingerprint {_short(fingerprint)}, this store "
                f"serves {_short(self.fingerprint)}: a state from another model is never overwritten silently; "
                f"delete it (store.delete({conversation_id!r})) first if it should be replaced.",
                conversation_id,
                [f"model fingerprint: stored {_short(fingerprint)}, this store {_short(self.fingerprint)}"],
            )
        return VersionConflict(
            f"conversation {conversation_id!r} is at version {version}, not expected_version={expected_version}: "
            f"another writer committed first; get({conversation_id!r}) again and retry with its version.",
            conversation_id,
            expected_version,
            version,
        )


# ------------------------------------------------------------------------------------------------------
# SQLite


class SQLiteSTMStore(STMStore):
    """One SQLite file, WAL journal, `synchronous=FULL`: every commit is durable and atomic.

    A small pool of connections (one per concurrently calling thread, reused) lets reads run in
    parallel; writers are serialised by SQLite (`busy_timeout_seconds` of waiting before an error).
    Several processes may open the same file. Every replace is one `UPDATE ... WHERE version=?` in
    a `BEGIN IMMEDIATE` transaction, so a killed process leaves each row at its last commit.
    """

    backend = "sqlite"
    _backend_error_types = (sqlite3.Error,)
    _backend_fix = (
        "Check that the database file is on a local, writable disk with free space and that no process holds "
        "a write transaction open for long (raise busy_timeout_seconds if writers are just slow)."
    )
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS stm_memory (
            conversation_id TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            owner TEXT,
            fingerprint TEXT NOT NULL,
            state BLOB NOT NULL,
            metadata TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX IF NOT EXISTS stm_memory_updated_at ON stm_memory (updated_at);
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        ttl_seconds: float | None = None,
        *,
        clock: Clock = time.time,
        busy_timeout_seconds: float = 30.0,
    ):
        super().__init__(fingerprint, shape, dtype, ttl_seconds, clock=clock)
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError(
                f"path={str(path)!r} must be a database file path: for a store without a file use "
                "InMemorySTMStore (open_store('memory://', ...))."
            )
        self.path = Path(path)
        self.busy_timeout_seconds = float(busy_timeout_seconds)
        self._idle_connections: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._translate_backend_errors("open"), self._connection() as connection:
            connection.executescript(self._SCHEMA)

    def _location(self) -> str:
        return f"path={str(self.path)!r}"

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions, each write below opens its own BEGIN IMMEDIATE.
            connection = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_seconds * 1000)}")
            journal_mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            connection.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as error:
            raise StoreError(
                f"cannot open the SQLite STM store at {str(self.path)!r} ({error}): check that the path is a "
                "writable file in an existing, writable directory."
            ) from error
        if str(journal_mode).lower() != "wal":
            connection.close()
            raise StoreError(
                f"SQLite refused WAL journal mode for {str(self.path)!r} (got {journal_mode!r}): put the database "
                "on a local filesystem (WAL does not work on network filesystems)."
            )
        return connection

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a pooled connection for the duration of one operation."""
        with self._pool_lock:
            self._ensure_open()
            connection = self._idle_connections.pop() if self._idle_connections else None
        if connection is None:
            connection = self._connect()
        try:
            yield connection
        finally:
            if connection.in_transaction:  # an error escaped mid-transaction: leave nothing half done
                connection.rollback()
            with self._pool_lock:
                if self._closed:
                    connection.close()
                else:
                    self._idle_connections.append(connection)

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (take the write lock up front, no upgrade deadlocks) ... COMMIT, or ROLLBACK."""
        with self._connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _create(self, row: _Row, cutoff: float | None) -> None:
        with self._write_transaction() as connection:
            if cutoff is not None:  # an expired row no longer owns its id
                connection.execute(
                    "DELETE FROM stm_memory WHERE conversation_id = ? AND updated_at < ?",
                    (row.conversation_id, cutoff),
                )
            try:
                connection.execute(
                    "INSERT INTO stm_memory (conversation_id, version, owner, fingerprint, state, metadata, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.conversation_id,
                        row.version,
                        row.owner,
                        row.fingerprint,
                        row.state,
                        json.dumps(row.metadata),
                        row.created_at,
                        row.updated_at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise self._exists(row.conversation_id) from error

    def _get(self, conversation_id: str) -> _Row | None:
        with self._connection() as connection:
            found = connection.execute(
                "SELECT version, owner, fingerprint, state, metadata, created_at, updated_at "
                "FROM stm_memory WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
        if found is None:
            return None
        version, owner, fingerprint, state, metadata, created_at, updated_at = found
        return _Row(conversation_id, version, owner, fingerprint, state, json.loads(metadata), created_at, updated_at)

    def _replace(self, conversation_id, state, expected_version, metadata, now, cutoff) -> _Row:
        metadata_json = None if metadata is None else json.dumps(metadata)
        with self._write_transaction() as connection:
            cursor = connection.execute(
                "UPDATE stm_memory SET version = version + 1, state = ?, updated_at = ?, "
                "metadata = COALESCE(?, metadata) "
                "WHERE conversation_id = ? AND version = ? AND fingerprint = ? AND (? IS NULL OR updated_at >= ?)",
                (state, now, metadata_json, conversation_id, expected_version, self.fingerprint, cutoff, cutoff),
            )
            if cursor.rowcount != 1:
                stored = connection.execute(
                    "SELECT version, fingerprint, updated_at FROM stm_memory WHERE conversation_id = ?",
                    (conversation_id,),
                ).fetchone()
                raise self._diagnose_failed_replace(conversation_id, expected_version, stored, cutoff, now)
            version, owner, stored_metadata, created_at = connection.execute(
                "SELECT version, owner, metadata, created_at FROM stm_memory WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
        return _Row(
            conversation_id, version, owner, self.fingerprint, state, json.loads(stored_metadata), created_at, now
        )

    def _delete(self, conversation_id: str) -> bool:
        with self._write_transaction() as connection:
            cursor = connection.execute("DELETE FROM stm_memory WHERE conversation_id = ?", (conversation_id,))
            return cursor.rowcount > 0

    def _evict(self, cutoff: float) -> int:
        with self._write_transaction() as connection:
            return connection.execute("DELETE FROM stm_memory WHERE updated_at < ?", (cutoff,)).rowcount

    def _count(self, cutoff: float | None) -> int:
        with self._connection() as connection:
            if cutoff is None:
                return connection.execute("SELECT COUNT(*) FROM stm_memory").fetchone()[0]
            return connection.execute("SELECT COUNT(*) FROM stm_memory WHERE updated_at >= ?", (cutoff,)).fetchone()[0]

    def _close(self) -> None:
        with self._pool_lock:
            idle, self._idle_connections = self._idle_connections, []
        for connection in idle:
            connection.close()


# ------------------------------------------------------------------------------------------------------
# Redis

# KEYS[1] conversation key. ARGV: cutoff ('' = no TTL), fingerprint, state, metadata, now, owner ('' = none), ttl_ms.
_REDIS_CREATE = """
local updated_at = redis.call('HGET', KEYS[1], 'updated_at')
if updated_at then
  if ARGV[1] ~= '' and tonumber(updated_at) < tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[1])
  else
    return 0
  end
end
redis.call('HSET', KEYS[1], 'version', '1', 'fingerprint', ARGV[2], 'state', ARGV[3], 'metadata', ARGV[4],
           'created_at', ARGV[5], 'updated_at', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
return 1
"""

# KEYS[1] conversation key. ARGV: expected_version, fingerprint, state, now, has_metadata ('1'/'0'), metadata,
# ttl_ms, cutoff ('' = no TTL). Returns {'ok', version, created_at, metadata, owner}, {'missing'} or
# {'failed', version, fingerprint, updated_at} when nothing was written.
_REDIS_REPLACE = """
local stored = redis.call('HMGET', KEYS[1], 'version', 'fingerprint', 'updated_at')
if not stored[1] then return {'missing'} end
local expired = ARGV[8] ~= '' and tonumber(stored[3]) < tonumber(ARGV[8])
if expired or stored[2] ~= ARGV[2] or stored[1] ~= ARGV[1] then
  return {'failed', stored[1], stored[2], stored[3]}  -- the client tells expired / incompatible / conflict apart
end
local version = tostring(tonumber(stored[1]) + 1)
redis.call('HSET', KEYS[1], 'version', version, 'state', ARGV[3], 'updated_at', ARGV[4])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'metadata', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
local rest = redis.call('HMGET', KEYS[1], 'created_at', 'metadata', 'owner')
return {'ok', version, rest[1], rest[2], rest[3] or ''}
"""

# KEYS[1] conversation key, ARGV[1] cutoff: delete the row if it was not updated since the cutoff.
_REDIS_EVICT_IF_EXPIRED = """
local updated_at = redis.call('HGET', KEYS[1], 'updated_at')
if updated_at and tonumber(updated_at) < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def _redact_url(url: str) -> str:
    """`url` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable url>"


class RedisSTMStore(STMStore):
    """One Redis hash per conversation under `{namespace}:conv:{conversation_id}`, for several replicas.

    `create` and `replace` are Lua scripts, so each is atomic on the Redis server (replace is a
    compare-and-set on the `version` field). With `ttl_seconds`, every write sets `PEXPIRE`, so Redis
    itself drops idle conversations: the server does not need to call `evict_expired`. It exists
    for the same semantics as the other backends (it SCANs the namespace and deletes rows whose
    `updated_at` is older than the TTL, e.g. ones written by a store without TTL); `count` SCANs too.
    Both are O(number of conversations).
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        fingerprint: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        ttl_seconds: float | None = None,
        namespace: str = "rxt",
        *,
        clock: Clock = time.time,
        socket_timeout_seconds: float = 10.0,
    ):
        super().__init__(fingerprint, shape, dtype, ttl_seconds, clock=clock)
        if not isinstance(namespace, str) or not namespace or not namespace.isprintable() or " " in namespace:
            raise ValueError(
                f"namespace={namespace!r} must be a non-empty string without spaces (e.g. 'rxt' or 'rxt-prod')."
            )
        try:
            import redis
        except ImportError as error:  # redis-py is in the `serve` extra
            raise StoreError(
                "RedisSTMStore needs redis-py: pip install -e '.[serve]' (or pip install redis)."
            ) from error
        self.url = url
        self.namespace = namespace
        self._backend_error_types = (redis.exceptions.RedisError,)
        self._backend_fix = "Check that Redis is up and reachable at this url (redis-cli ping)."
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_seconds, socket_connect_timeout=socket_timeout_seconds
        )
        try:
            self._client.ping()
        except redis.exceptions.RedisError as error:
            self._client.close()
            raise StoreError(
                f"cannot reach Redis at {_redact_url(url)} ({error}): start redis-server or fix the url "
                "(redis://host:port/db)."
            ) from error
        self._create_script = self._client.register_script(_REDIS_CREATE)
        self._replace_script = self._client.register_script(_REDIS_REPLACE)
        self._evict_script = self._client.register_script(_REDIS_EVICT_IF_EXPIRED)
        self._ttl_ms = 0 if ttl_seconds is None else max(1, math.ceil(ttl_seconds * 1000))

    def _location(self) -> str:
        return f"url={_redact_url(self.url)!r}, namespace={self.namespace!r}"

    def _key(self, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{conversation_id}"

    def _key_pattern(self) -> str:
        escaped = "".join("\\" + char if char in "*?[]\\" else char for char in self.namespace)
        return f"{escaped}:conv:*"

    def _create(self, row: _Row, cutoff: float | None) -> None:
        created = self._create_script(
            keys=[self._key(row.conversation_id)],
            args=[
                "" if cutoff is None else repr(cutoff),
                row.fingerprint,
                row.state,
                json.dumps(row.metadata),
                repr(row.created_at),
                row.owner or "",
                self._ttl_ms,
            ],
        )
        if not created:
            raise self._exists(row.conversation_id)

    def _get(self, conversation_id: str) -> _Row | None:
        fields = self._client.hgetall(self._key(conversation_id))
        if not fields:
            return None
        owner = fields.get(b"owner")
        return _Row(
            conversation_id=conversation_id,
            version=int(fields[b"version"]),
            owner=None if owner is None else owner.decode("utf-8"),
            fingerprint=fields[b"fingerprint"].decode("utf-8"),
            state=fields[b"state"],
            metadata=json.loads(fields[b"metadata"]),
            created_at=float(fields[b"created_at"]),
            updated_at=float(fields[b"updated_at"]),
        )

    def _replace(self, conversation_id, state, expected_version, metadata, now, cutoff) -> _Row:
        result = self._replace_script(
            keys=[self._key(conversation_id)],
            args=[
                str(expected_version),
                self.fingerprint,
                state,
                repr(now),
                "0" if metadata is None else "1",
                "" if metadata is None else json.dumps(metadata),
                self._ttl_ms,
                "" if cutoff is None else repr(cutoff),
            ],
        )
        status = result[0]
        if status == b"missing":
            raise self._not_found(conversation_id)
        if status != b"ok":
            version, fingerprint, updated_at = int(result[1]), result[2].decode("utf-8"), float(result[3])
            raise self._diagnose_failed_replace(
                conversation_id, expected_version, (version, fingerprint, updated_at), cutoff, now
            )
        _, version, created_at, stored_metadata, owner = result
        return _Row(
            conversation_id=conversation_id,
            version=int(version),
            owner=owner.decode("utf-8") or None,
            fingerprint=self.fingerprint,
            state=state,
            metadata=json.loads(stored_metadata),
            created_at=float(created_at),
            updated_at=now,
        )

    def _delete(self, conversation_id: str) -> bool:
        return bool(self._client.delete(self._key(conversation_id)))

    def _scan_keys(self, batch_size: int = 500) -> Iterator[list[bytes]]:
        batch: list[bytes] = []
        for key in self._client.scan_iter(match=self._key_pattern(), count=batch_size):
            batch.append(key)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _evict(self, cutoff: float) -> int:
        removed = 0
        for keys in self._scan_keys():
            pipeline = self._client.pipeline(transaction=False)
            for key in keys:
                self._evict_script(keys=[key], args=[repr(cutoff)], client=pipeline)
            removed += sum(int(result) for result in pipeline.execute())
        return removed

    def _count(self, cutoff: float | None) -> int:
        live = 0
        for keys in self._scan_keys():
            if cutoff is None:
                live += len(keys)
                continue
            pipeline = self._client.pipeline(transaction=False)
            for key in keys:
                pipeline.hget(key, "updated_at")
            updated = pipeline.execute()
            live += sum(1 for updated_at in updated if updated_at is not None and float(updated_at) >= cutoff)
        return live

    def _close(self) -> None:
        self._client.close()


# ------------------------------------------------------------------------------------------------------
# in memory


class InMemorySTMStore(STMStore):
    """A dict in this process, nothing persisted; same semantics as the other backends (tests, demos).

    `share_with=another_in_memory_store` makes this store see the same conversations (e.g. two
    stores built for different models in one process, as a real shared database would).
    """

    backend = "memory"

    def __init__(
        self,
        fingerprint: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        ttl_seconds: float | None = None,
        *,
        clock: Clock = time.time,
        share_with: "InMemorySTMStore | None" = None,
    ):
        super().__init__(fingerprint, shape, dtype, ttl_seconds, clock=clock)
        if share_with is not None and not isinstance(share_with, InMemorySTMStore):
            raise ValueError(f"share_with={share_with!r} must be an InMemorySTMStore or None.")
        self._rows: dict[str, _Row] = {} if share_with is None else share_with._rows
        self._lock: threading.Lock = threading.Lock() if share_with is None else share_with._lock

    def _location(self) -> str:
        return "memory"

    def _create(self, row: _Row, cutoff: float | None) -> None:
        with self._lock:
            existing = self._rows.get(row.conversation_id)
            if existing is not None and (cutoff is None or existing.updated_at >= cutoff):
                raise self._exists(row.conversation_id)
            self._rows[row.conversation_id] = row

    def _get(self, conversation_id: str) -> _Row | None:
        with self._lock:
            return self._rows.get(conversation_id)

    def _replace(self, conversation_id, state, expected_version, metadata, now, cutoff) -> _Row:
        with self._lock:
            stored = self._rows.get(conversation_id)
            if (
                stored is None
                or (cutoff is not None and stored.updated_at < cutoff)
                or stored.fingerprint != self.fingerprint
                or stored.version != expected_version
            ):
                summary = None if stored is None else (stored.version, stored.fingerprint, stored.updated_at)
                raise self._diagnose_failed_replace(conversation_id, expected_version, summary, cutoff, now)
            row = _Row(
                conversation_id=conversation_id,
                version=stored.version + 1,
                owner=stored.owner,
                fingerprint=self.fingerprint,
                state=state,
                metadata=stored.metadata if metadata is None else metadata,
                created_at=stored.created_at,
                updated_at=now,
            )
            self._rows[conversation_id] = row  # rows are never mutated in place: readers keep a consistent one
            return row

    def _delete(self, conversation_id: str) -> bool:
        with self._lock:
            return self._rows.pop(conversation_id, None) is not None

    def _evict(self, cutoff: float) -> int:
        with self._lock:
            expired = [key for key, row in self._rows.items() if row.updated_at < cutoff]
            for key in expired:
                del self._rows[key]
            return len(expired)

    def _count(self, cutoff: float | None) -> int:
        with self._lock:
            return sum(1 for row in self._rows.values() if cutoff is None or row.updated_at >= cutoff)

    def _close(self) -> None:
        pass  # the rows stay with any store sharing them


# ------------------------------------------------------------------------------------------------------
# open by url

_ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, redis://host:port/db (or rediss:// for TLS), memory://"
)


def open_store(
    url: str,
    fingerprint: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ttl_seconds: float | None = None,
    **options: Any,
) -> STMStore:
    """Open the store a URL names: `sqlite:///rel.db`, `sqlite:////abs.db`, `redis://host:port/db`, `memory://`.

    `options` go to the backend's constructor (e.g. `namespace=` for Redis, `clock=` for any).
    ValueError for any other URL.
    """

    def bad(reason: str) -> ValueError:
        shown = _redact_url(url) if isinstance(url, str) else repr(url)
        return ValueError(f"open_store(url={shown!r}): {reason}; accepted forms: {_ACCEPTED_URLS}.")

    if not isinstance(url, str):
        raise bad(f"url must be a string, got {type(url).__name__}")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise bad("no scheme (like sqlite:// or redis://)")
    if scheme == "sqlite":
        # sqlite:/// + relative path, sqlite://// + absolute path (the SQLAlchemy convention).
        if not rest.startswith("/"):
            raise bad("a SQLite url has three slashes before a relative path and four before an absolute one")
        path = rest[1:]
        if path in ("", "/") or path.endswith("/") or path == ":memory:":
            raise bad("the SQLite url names no database file (use memory:// for a store without a file)")
        return SQLiteSTMStore(path, fingerprint, shape, dtype, ttl_seconds, **options)
    if scheme in ("redis", "rediss"):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a non-numeric port
        except ValueError as error:
            raise bad(f"the Redis url does not parse ({error})") from error
        if not parts.hostname:
            raise bad("the Redis url names no host")
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise bad(f"the Redis database must be a number (redis://host:port/0), got {database!r}")
        return RedisSTMStore(url, fingerprint, shape, dtype, ttl_seconds, **options)
    if scheme == "memory":
        if rest:
            raise bad("memory:// takes nothing after the scheme")
        return InMemorySTMStore(fingerprint, shape, dtype, ttl_seconds, **options)
    raise bad(f"unknown scheme {scheme!r}")
