"""STM store for serving: SQLite / Redis / in-memory backends with the same semantics, real behaviour.

Redis tests start a real `redis-server` on a free loopback port (skipped only if it is not installed).
"""

import copy
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from rxt_hf.modeling_rxt.format_rxt import STM_FORMAT, stm_from_bytes
from rxt_hf.serving.store import (
    ConversationExists,
    ConversationNotFound,
    IncompatibleMemory,
    InMemorySTMStore,
    RedisSTMStore,
    SQLiteSTMStore,
    StoreError,
    VersionConflict,
    model_fingerprint,
    open_store,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "a" * 64
OTHER_FINGERPRINT = "b" * 64
STM_SHAPE = (2, 4, 8)  # (layers, slots, dim) as in config.stm_shape
STATE_SHAPE = (1, *STM_SHAPE)


class FakeClock:
    """A settable time source for TTL tests."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def random_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(STATE_SHAPE, generator=generator).to(dtype)


def filled_state(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(STATE_SHAPE, float(value), dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# fixtures: a real redis-server, and one store factory per backend


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not on PATH: install it (apt-get install redis-server) to run the Redis tests")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        process = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        client.close()
        if process.poll() is None:
            break
        output = process.stdout.read().decode(errors="replace")
    else:
        pytest.fail(f"redis-server did not start: {output[-2000:]}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_test_store(request, tmp_path):
    """`open_test_store(fingerprint=..., dtype=..., ...)`: a store of the parametrised backend.

    Every store opened in one test sees the same data (same SQLite file, same Redis namespace,
    shared in-memory rows), like several server processes would.
    """
    backend = request.param
    redis_location = request.getfixturevalue("redis_url") if backend == "redis" else None
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    opened = []

    def open_one(fingerprint=FINGERPRINT, shape=STM_SHAPE, dtype=torch.float32, ttl_seconds=None, clock=time.time):
        if backend == "memory":
            store = InMemorySTMStore(
                fingerprint, shape, dtype, ttl_seconds, clock=clock, share_with=opened[0] if opened else None
            )
        elif backend == "sqlite":
            store = SQLiteSTMStore(tmp_path / "stm.db", fingerprint, shape, dtype, ttl_seconds, clock=clock)
        else:
            store = RedisSTMStore(redis_location, fingerprint, shape, dtype, ttl_seconds, namespace, clock=clock)
        opened.append(store)
        return store

    open_one.backend = backend
    yield open_one
    for store in opened:
        store.close()


# ------------------------------------------------------------------------------------------------------
# semantics shared by every backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_is_exact(open_test_store, dtype):
    clock = FakeClock()
    store = open_test_store(dtype=dtype, clock=clock)
    state = random_state(1, dtype)
    created = store.create("conv-1", state, owner="owner-hash", metadata={"system_prompt": "Be brief.", "turns": "0"})
    assert (created.version, created.owner) == (1, "owner-hash")
    assert created.created_at == created.updated_at == clock.now
    loaded = store.get("conv-1")
    assert loaded.stm_state.dtype == dtype and loaded.stm_state.device.type == "cpu"
    assert tuple(loaded.stm_state.shape) == STATE_SHAPE
    assert torch.equal(loaded.stm_state, state)
    assert loaded.version == 1 and loaded.owner == "owner-hash"
    assert loaded.metadata == {"system_prompt": "Be brief.", "turns": "0"}
    assert (loaded.created_at, loaded.updated_at) == (clock.now, clock.now)
    assert store.count() == 1
    # no owner, no metadata; a later in-place change of the caller's tensor does not reach the store
    state_2 = random_state(2, dtype)
    assert store.create("conv-2", state_2).owner is None
    expected = state_2.clone()
    state_2.zero_()
    assert store.get("conv-2").owner is None and store.get("conv-2").metadata == {}
    assert torch.equal(store.get("conv-2").stm_state, expected)


def test_replace_increments_version_and_keeps_identity(open_test_store):
    clock = FakeClock()
    store = open_test_store(clock=clock)
    created = store.create("conv", filled_state(1), owner="alice", metadata={"turns": "0"})
    row = created
    for turn in range(1, 4):
        clock.advance(5)
        row = store.replace("conv", filled_state(turn + 1), expected_version=row.version)
        assert row.version == turn + 1
        assert row.owner == "alice" and row.created_at == created.created_at and row.updated_at == clock.now
        assert row.metadata == {"turns": "0"}  # metadata=None keeps it
    row = store.replace("conv", filled_state(9), expected_version=4, metadata={"turns": "4"})
    loaded = store.get("conv")
    assert (loaded.version, loaded.metadata, loaded.owner) == (5, {"turns": "4"}, "alice")
    assert torch.equal(loaded.stm_state, filled_state(9)) and torch.equal(row.stm_state, filled_state(9))
    assert loaded.updated_at == clock.now and loaded.created_at == created.created_at


def test_compare_and_set_two_writers_one_wins(open_test_store):
    first, second = open_test_store(), open_test_store()  # like two server processes
    first.create("conv", filled_state(1))
    seen_by_both = second.get("conv").version
    first.replace("conv", filled_state(2), expected_version=seen_by_both)
    with pytest.raises(VersionConflict, match=r"version 2, not expected_version=1") as conflict:
        second.replace("conv", filled_state(3), expected_version=seen_by_both)
    assert (conflict.value.conversation_id, conflict.value.expected_version, conflict.value.current_version) == (
        "conv", 1, 2,
    )
    loaded = second.get("conv")
    assert loaded.version == 2 and torch.equal(loaded.stm_state, filled_state(2))
    with pytest.raises(VersionConflict):  # a version from the future is a conflict too
        first.replace("conv", filled_state(4), expected_version=7)


def test_threaded_race_exactly_one_writer_wins(open_test_store):
    store = open_test_store()
    store.create("conv", filled_state(0))
    writers = 12
    barrier = threading.Barrier(writers)
    winners, losers, failures = [], [], []

    def write(writer: int):
        barrier.wait()
        try:
            store.replace("conv", filled_state(writer + 1), expected_version=1)
            winners.append(writer)
        except VersionConflict:
            losers.append(writer)
        except BaseException as error:  # anything else fails the test below
            failures.append(error)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(winners) == 1 and len(losers) == writers - 1
    loaded = store.get("conv")
    assert loaded.version == 2 and torch.equal(loaded.stm_state, filled_state(winners[0] + 1))


def test_threaded_increments_lose_no_update(open_test_store):
    """Read-modify-write with retry on VersionConflict: every increment lands exactly once."""
    store = open_test_store()
    store.create("counter", filled_state(0))
    threads_count, increments = 6, 5
    failures = []

    def increment_many():
        try:
            for _ in range(increments):
                while True:
                    row = store.get("counter")
                    try:
                        store.replace("counter", row.stm_state + 1, expected_version=row.version)
                        break
                    except VersionConflict:
                        continue
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=increment_many) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    loaded = store.get("counter")
    assert loaded.version == 1 + threads_count * increments
    assert torch.equal(loaded.stm_state, filled_state(threads_count * increments))


def test_not_found_exists_and_delete(open_test_store):
    store = open_test_store()
    with pytest.raises(ConversationNotFound, match="'missing'") as missing:
        store.get("missing")
    assert isinstance(missing.value, KeyError) and missing.value.conversation_id == "missing"
    assert str(missing.value).startswith("conversation 'missing' is not in")  # a message, not a quoted repr
    with pytest.raises(ConversationNotFound):
        store.replace("missing", filled_state(1), expected_version=1)
    assert store.delete("missing") is False

    store.create("conv", filled_state(1), owner="alice")
    with pytest.raises(ConversationExists, match="'conv' already exists"):
        store.create("conv", filled_state(2), owner="mallory")
    assert store.get("conv").owner == "alice" and torch.equal(store.get("conv").stm_state, filled_state(1))

    assert store.delete("conv") is True
    assert store.delete("conv") is False
    with pytest.raises(ConversationNotFound):
        store.get("conv")
    assert store.count() == 0
    assert store.create("conv", filled_state(3)).version == 1  # the id is free again


def test_ttl_expiry_counts_from_last_update(open_test_store):
    clock = FakeClock()
    store = open_test_store(ttl_seconds=10, clock=clock)
    store.create("old", filled_state(1))
    store.create("refreshed", filled_state(1))
    clock.advance(6)
    store.create("young", filled_state(1))
    store.replace("refreshed", filled_state(2), expected_version=1)  # a write refreshes the TTL
    clock.advance(6)  # old: 12 s idle, refreshed / young: 6 s
    with pytest.raises(ConversationNotFound, match="expired"):
        store.get("old")
    with pytest.raises(ConversationNotFound, match="expired"):
        store.replace("old", filled_state(2), expected_version=1)
    assert store.get("refreshed").version == 2 and store.get("young").version == 1
    assert store.count() == 2
    # an expired id can be created again before eviction
    assert store.create("old", filled_state(5)).version == 1
    clock.advance(11)  # everything is expired now
    assert store.count() == 0
    assert store.evict_expired(now=clock.now - 11) == 0  # as of the earlier time nothing had expired
    assert store.evict_expired(now=clock.now) == 3
    assert store.evict_expired() == 0
    with pytest.raises(ConversationNotFound):
        store.get("young")


def test_evict_without_ttl_removes_nothing(open_test_store):
    store = open_test_store()
    store.create("conv", filled_state(1))
    assert store.evict_expired(now=time.time() + 10**9) == 0
    assert store.get("conv").version == 1


def test_state_from_another_model_is_refused(open_test_store):
    writer = open_test_store()
    writer.create("conv", random_state(3))

    other_model = open_test_store(fingerprint=OTHER_FINGERPRINT)
    mismatch = r"model fingerprint: stored aaaaaaaaaaaaaaaa\.\.\., this store bbbbbbbbbbbbbbbb"
    with pytest.raises(IncompatibleMemory, match=mismatch) as refused:
        other_model.get("conv")
    assert "delete it" in str(refused.value) and refused.value.conversation_id == "conv"
    with pytest.raises(IncompatibleMemory, match="model fingerprint"):  # and never overwritten silently
        other_model.replace("conv", random_state(4), expected_version=1)
    with pytest.raises(IncompatibleMemory, match=r"dtype: stored float32, this store bfloat16"):
        open_test_store(dtype=torch.bfloat16).get("conv")
    with pytest.raises(IncompatibleMemory, match=r"shape: stored \[1, 2, 4, 8\], this store \[1, 2, 6, 8\]"):
        open_test_store(shape=(2, 6, 8)).get("conv")

    loaded = writer.get("conv")  # the right model still reads it, unchanged
    assert loaded.version == 1 and torch.equal(loaded.stm_state, random_state(3))
    assert other_model.delete("conv") is True  # explicit delete is the way out


def test_wrong_inputs_are_refused_and_nothing_is_written(open_test_store):
    store = open_test_store()
    bad_states = [
        (torch.zeros(STM_SHAPE), r"shape \[2, 4, 8\].*unsqueeze\(0\)"),  # missing batch dimension
        (torch.zeros(2, *STM_SHAPE), r"shape \[2, 2, 4, 8\]"),  # a batch of two conversations
        (torch.zeros(1, 2, 5, 8), r"shape \[1, 2, 5, 8\]"),
        (torch.zeros(STATE_SHAPE, dtype=torch.bfloat16), r"dtype bfloat16.*holds float32"),
        ([[0.0]], "must be a torch.Tensor"),
    ]
    for bad_state, message in bad_states:
        with pytest.raises(ValueError, match=message):
            store.create("conv", bad_state)
    assert store.count() == 0
    with pytest.raises(ConversationNotFound):
        store.get("conv")

    store.create("conv", filled_state(1))
    for bad_state, message in bad_states:
        with pytest.raises(ValueError, match=message):
            store.replace("conv", bad_state, expected_version=1)
    with pytest.raises(ValueError, match="expected_version"):
        store.replace("conv", filled_state(2), expected_version="1")
    with pytest.raises(ValueError, match="metadata"):
        store.replace("conv", filled_state(2), expected_version=1, metadata={"turns": 3})
    with pytest.raises(ValueError, match="metadata is .* bytes"):
        store.replace("conv", filled_state(2), expected_version=1, metadata={"huge": "x" * 70_000})
    for bad_id in ["", "a" * 257, "line\nbreak", 42]:
        with pytest.raises(ValueError, match="conversation_id"):
            store.get(bad_id)
    with pytest.raises(ValueError, match="owner"):
        store.create("conv-2", filled_state(1), owner="")
    loaded = store.get("conv")
    assert loaded.version == 1 and torch.equal(loaded.stm_state, filled_state(1)) and store.count() == 1


def test_closed_store_refuses_calls(open_test_store):
    with open_test_store() as store:
        store.create("conv", filled_state(1))
    with pytest.raises(StoreError, match="closed"):
        store.get("conv")
    store.close()  # idempotent


def test_constructor_arguments_are_checked():
    for kwargs, message in [
        (dict(fingerprint=""), "fingerprint"),
        (dict(shape=(1, 2)), "shape"),
        (dict(shape=(2, 2, 4, 8)), "shape"),
        (dict(shape=(0, 4, 8)), "shape"),
        (dict(dtype="float32"), "dtype"),
        (dict(ttl_seconds=0), "ttl_seconds"),
        (dict(ttl_seconds=float("inf")), "ttl_seconds"),
    ]:
        arguments = dict(fingerprint=FINGERPRINT, shape=STM_SHAPE, dtype=torch.float32) | kwargs
        with pytest.raises(ValueError, match=message):
            InMemorySTMStore(**arguments)
    assert InMemorySTMStore(FINGERPRINT, STATE_SHAPE, torch.float32).shape == STATE_SHAPE


# ------------------------------------------------------------------------------------------------------
# open_store


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("memory://", FINGERPRINT, STM_SHAPE, torch.float32) as store:
        assert isinstance(store, InMemorySTMStore)
    with open_store("sqlite:///data/relative.db", FINGERPRINT, STM_SHAPE, torch.float32, ttl_seconds=60) as store:
        assert isinstance(store, SQLiteSTMStore) and store.ttl_seconds == 60
        store.create("conv", filled_state(1))
    assert (tmp_path / "data" / "relative.db").is_file()  # relative to the working directory, folder created
    absolute = tmp_path / "elsewhere" / "absolute.db"
    with open_store(f"sqlite:///{absolute}", FINGERPRINT, STM_SHAPE, torch.float32) as store:  # 4 slashes
        assert store.path == absolute
    assert absolute.is_file()


def test_open_store_redis_url(redis_url):
    with open_store(redis_url, FINGERPRINT, STM_SHAPE, torch.float32, namespace="urltest") as store:
        assert isinstance(store, RedisSTMStore) and store.namespace == "urltest"
        store.create("conv", filled_state(1))
        assert store.get("conv").version == 1
        assert store.delete("conv")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "stm.db",
        "postgres://localhost/stm",
        "sqlite://stm.db",
        "sqlite:///",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///some/folder/",
        "redis://localhost:notaport/0",
        "redis://localhost:6379/zero",
        "redis:///0",
        "memory://name",
    ],
)
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(ValueError, match="open_store\\(url=") as refused:
        open_store(url, FINGERPRINT, STM_SHAPE, torch.float32)
    assert repr(url) in str(refused.value) and "sqlite:///relative/path.db" in str(refused.value)


def test_redis_unreachable_is_a_clear_error():
    with pytest.raises(StoreError, match=r"cannot reach Redis at redis://127\.0\.0\.1:\d+/0 .*start redis-server"):
        RedisSTMStore(f"redis://127.0.0.1:{_free_port()}/0", FINGERPRINT, STM_SHAPE, torch.float32,
                      socket_timeout_seconds=1.0)


def test_password_is_not_shown_in_errors():
    with pytest.raises(ValueError) as refused:
        open_store("redis://user:secret@localhost:6379/zero", FINGERPRINT, STM_SHAPE, torch.float32)
    assert "secret" not in str(refused.value)


# ------------------------------------------------------------------------------------------------------
# backend specifics


def test_sqlite_file_layout_and_persistence_across_reopen(tmp_path):
    path = tmp_path / "stm.db"
    state = random_state(5, torch.bfloat16)
    with SQLiteSTMStore(path, FINGERPRINT, STM_SHAPE, torch.bfloat16) as store:
        store.create("conv", state, owner="alice", metadata={"turns": "1"})
        store.replace("conv", state * 2, expected_version=1)
    with SQLiteSTMStore(path, FINGERPRINT, STM_SHAPE, torch.bfloat16) as reopened:
        loaded = reopened.get("conv")
        assert loaded.version == 2 and loaded.owner == "alice" and loaded.metadata == {"turns": "1"}
        assert torch.equal(loaded.stm_state, state * 2)

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in raw.execute("PRAGMA table_info(stm_memory)")]
        assert columns == [
            "conversation_id", "version", "owner", "fingerprint", "state", "metadata", "created_at", "updated_at",
        ]
        version, fingerprint, blob = raw.execute("SELECT version, fingerprint, state FROM stm_memory").fetchone()
    assert (version, fingerprint) == (2, FINGERPRINT)
    from safetensors.torch import load

    assert torch.equal(load(blob)["stm_state"], state * 2)  # plain safetensors bytes
    assert STM_FORMAT.encode() in blob[:400]  # the one STM format of modeling_rxt.format_rxt


def legacy_store_blob(state: torch.Tensor, fingerprint: str) -> bytes:
    """A row's state as the store wrote it before it used the one STM format (`rxt-stm-store/1`)."""
    from safetensors.torch import save

    metadata = {"format": "rxt-stm-store/1", "fingerprint": fingerprint, "dtype": str(state.dtype).removeprefix("torch."),
                "shape": json.dumps(list(state.shape))}
    return save({"stm_state": state.contiguous()}, metadata=metadata)


def test_rows_of_the_former_store_format_are_still_read(tmp_path):
    path = tmp_path / "stm.db"
    state = random_state(6)
    with SQLiteSTMStore(path, FINGERPRINT, STM_SHAPE, torch.float32) as store:
        store.create("old", filled_state(0), metadata={"turns": "3"})
        store.create("foreign", filled_state(0))
        with sqlite3.connect(path) as raw:  # rows written by the previous release
            raw.execute("UPDATE stm_memory SET state = ? WHERE conversation_id = 'old'",
                        (legacy_store_blob(state, FINGERPRINT),))
            raw.execute("UPDATE stm_memory SET state = ? WHERE conversation_id = 'foreign'",
                        (legacy_store_blob(state, OTHER_FINGERPRINT),))
        loaded = store.get("old")
        assert torch.equal(loaded.stm_state, state) and loaded.metadata == {"turns": "3"}
        with pytest.raises(IncompatibleMemory, match="model fingerprint: stored bbbbbbbbbbbbbbbb"):
            store.get("foreign")  # the old rows' fingerprint is still checked
        store.replace("old", state * 2, expected_version=1)  # the next write is in the one STM format
        with sqlite3.connect(path) as raw:
            blob = raw.execute("SELECT state FROM stm_memory WHERE conversation_id = 'old'").fetchone()[0]
    tensor, metadata = stm_from_bytes(blob)
    assert torch.equal(tensor, state * 2) and metadata == {"model_fingerprint": FINGERPRINT}


def test_sqlite_connections_are_durable(tmp_path):
    store = SQLiteSTMStore(tmp_path / "stm.db", FINGERPRINT, STM_SHAPE, torch.float32)
    with store._connection() as connection:
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_sqlite_unreadable_row_is_refused_not_used(tmp_path):
    path = tmp_path / "stm.db"
    with SQLiteSTMStore(path, FINGERPRINT, STM_SHAPE, torch.float32) as store:
        store.create("conv", filled_state(1))
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE stm_memory SET state = ?", (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",))
        with pytest.raises(IncompatibleMemory, match="not an STM state of this store"):
            store.get("conv")


def test_sqlite_busy_database_is_a_store_error(tmp_path):
    path = tmp_path / "stm.db"
    store = SQLiteSTMStore(path, FINGERPRINT, STM_SHAPE, torch.float32, busy_timeout_seconds=0.1)
    store.create("conv", filled_state(1))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(StoreError, match="replace of conversation 'conv' failed.*locked"):
            store.replace("conv", filled_state(2), expected_version=1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.replace("conv", filled_state(2), expected_version=1).version == 2
    store.close()


_CRASH_WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from rxt_hf.serving.store import SQLiteSTMStore

    shape = (1, 6, 256, 128)  # an rxt-alpha-micro sized STM: 768 KiB per write
    store = SQLiteSTMStore(sys.argv[1], "crash-test", shape, torch.float32)
    version = store.get("conv").version
    while True:
        next_version = version + 1
        row = store.replace(
            "conv", torch.full(shape, float(next_version)), expected_version=version,
            metadata={"turns": str(next_version)},
        )
        version = row.version
        print(version, flush=True)
    """
)


def test_sqlite_survives_sigkill_mid_update(tmp_path):
    """A writer SIGKILLed while looping replace leaves the row at its last committed version, intact."""
    path = tmp_path / "stm.db"
    shape = (1, 6, 256, 128)
    with SQLiteSTMStore(path, "crash-test", shape, torch.float32) as store:
        store.create("conv", torch.full(shape, 1.0), metadata={"turns": "1"})
    writer = subprocess.Popen(
        [sys.executable, "-c", _CRASH_WRITER, str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    last_reported = 1
    try:
        deadline = time.monotonic() + 30
        while last_reported < 25 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                pytest.fail(f"the writer stopped: {writer.stderr.read().decode(errors='replace')[-2000:]}")
            last_reported = int(line)
        assert last_reported >= 25, "the writer was too slow to reach 25 commits in 30 s"
        time.sleep(0.013)  # land the kill at an arbitrary point of a write
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with SQLiteSTMStore(path, "crash-test", shape, torch.float32) as reopened:
        row = reopened.get("conv")
        assert row.version >= last_reported  # every commit the writer reported is durable
        assert torch.equal(row.stm_state, torch.full(shape, float(row.version)))  # state matches its version
        assert row.metadata == {"turns": str(row.version)}
        assert reopened.replace("conv", torch.zeros(shape), expected_version=row.version).version == row.version + 1


def test_redis_layout_and_native_expiry(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    with RedisSTMStore(redis_url, FINGERPRINT, STM_SHAPE, torch.float32, ttl_seconds=0.4, namespace=namespace) as store:
        store.create("conv", filled_state(1), owner="alice")
        key = f"{namespace}:conv:conv"
        fields = client.hgetall(key)
        assert set(fields) == {
            b"version", b"owner", b"fingerprint", b"state", b"metadata", b"created_at", b"updated_at",
        }
        assert fields[b"version"] == b"1" and fields[b"owner"] == b"alice"
        assert 0 < client.pttl(key) <= 400
        time.sleep(0.25)
        store.replace("conv", filled_state(2), expected_version=1)
        assert client.pttl(key) > 250  # the write refreshed the expiry
        time.sleep(0.6)
        assert client.exists(key) == 0  # Redis dropped it by itself
        with pytest.raises(ConversationNotFound):
            store.get("conv")
        assert store.count() == 0
    client.close()


def test_redis_namespaces_are_separate(redis_url):
    first = RedisSTMStore(redis_url, FINGERPRINT, STM_SHAPE, torch.float32, namespace="tenant[a]*")
    second = RedisSTMStore(redis_url, FINGERPRINT, STM_SHAPE, torch.float32, namespace="tenant-b")
    try:
        first.create("conv", filled_state(1))
        assert second.count() == 0 and first.count() == 1
        with pytest.raises(ConversationNotFound):
            second.get("conv")
        assert first.evict_expired() == 0 and first.delete("conv")
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------------------------------------
# model fingerprint


def _tiny_model(seed: int = 0):
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny")).eval()


def test_model_fingerprint_tracks_config_and_weights(tmp_path):
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

    model = _tiny_model(seed=0)
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert model_fingerprint(model) == fingerprint
    assert model_fingerprint(_tiny_model(seed=0)) == fingerprint  # same weights, same fingerprint

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        next(perturbed.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(perturbed) != fingerprint
    assert model_fingerprint(_tiny_model(seed=1)) != fingerprint  # same geometry, other weights
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fingerprint
    torch.manual_seed(0)
    other_config = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", rope_theta=5000.0)).eval()
    assert model_fingerprint(other_config) != fingerprint  # same weights, other config

    # saved and reloaded: same fingerprint (bookkeeping config keys such as auto_map / dtype are ignored)
    model.save_pretrained(tmp_path / "model")
    assert model_fingerprint(RxTForCausalLM.from_pretrained(tmp_path / "model")) == fingerprint

    with pytest.raises(TypeError, match="model_fingerprint"):
        model_fingerprint(object())


def test_model_fingerprint_is_fast_for_a_12m_parameter_model():
    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM

    model = RxTForCausalLM(RxTConfig.from_preset("rxt-alpha-micro")).eval()
    started = time.perf_counter()
    model_fingerprint(model)
    assert time.perf_counter() - started < 1.0


_FINGERPRINT_OF_A_SMALL_MODULE = textwrap.dedent(
    """
    import json
    import torch
    from rxt_hf.serving.store import model_fingerprint

    class Config:
        def to_json_string(self, use_diff=True):
            return json.dumps({"hidden_size": 8, "layers": [1, 2], "_name_or_path": "anywhere"})

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    module[2].to(torch.bfloat16)
    module.config = Config()
    result = model_fingerprint(module)
    """
)


def test_model_fingerprint_is_the_same_in_another_process():
    namespace: dict = {}
    exec(_FINGERPRINT_OF_A_SMALL_MODULE, namespace)
    completed = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_OF_A_SMALL_MODULE + "print(result)"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == namespace["result"]
