"""The Store contract (smart_app/store.py), run against every backend through the ``store`` fixture.

To add a backend, add a param to ``store`` (a PostgreSQL run: a param that builds ``PostgresStore(dsn, clock=...)``
on a server the test run starts, marked ``postgres``). Time is a fake clock so expiry is tested without sleeping.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from smart_app.store import LockTimeout, SQLiteStore, StoreError, open_store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _sqlite_memory(tmp_path: Path, clock: FakeClock):
    return SQLiteStore(":memory:", clock=clock, sleep=lambda s: clock.advance(s))


def _sqlite_file(tmp_path: Path, clock: FakeClock):
    return SQLiteStore(str(tmp_path / "store.db"), clock=clock, sleep=lambda s: clock.advance(s))


BACKENDS = {"sqlite-memory": _sqlite_memory, "sqlite-file": _sqlite_file}


@pytest.fixture(params=[*sorted(BACKENDS), pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path, clock):
    if request.param == "postgres":
        from smart_app.store import PostgresStore
        from tests.fixtures.postgres import unique_prefix

        dsn = request.getfixturevalue("postgres_dsn")  # skips when PostgreSQL is not installed
        s = PostgresStore(dsn, table_prefix=unique_prefix(), clock=clock, sleep=lambda t: clock.advance(t))
    else:
        s = BACKENDS[request.param](tmp_path, clock)
    yield s
    s.close()


def test_put_get_delete(store):
    assert store.get("ns", "k") is None
    store.put("ns", "k", {"a": [1, 2], "b": None, "c": "é"}, ttl=60)
    assert store.get("ns", "k") == {"a": [1, 2], "b": None, "c": "é"}
    store.put("ns", "k", "replaced", ttl=60)
    assert store.get("ns", "k") == "replaced"
    store.delete("ns", "k")
    assert store.get("ns", "k") is None
    store.delete("ns", "k")  # deleting a missing key is fine


def test_namespaces_are_separate(store):
    store.put("a", "k", 1, ttl=60)
    store.put("b", "k", 2, ttl=60)
    assert (store.get("a", "k"), store.get("b", "k")) == (1, 2)


def test_expiry(store, clock):
    store.put("ns", "k", "v", ttl=10)
    clock.advance(9.9)
    assert store.get("ns", "k") == "v"
    clock.advance(0.2)
    assert store.get("ns", "k") is None
    assert store.take("ns", "k") is None


def test_add_only_when_absent_or_expired(store, clock):
    assert store.add("ns", "k", 1, ttl=10) is True
    assert store.add("ns", "k", 2, ttl=10) is False
    assert store.get("ns", "k") == 1
    clock.advance(11)
    assert store.add("ns", "k", 3, ttl=10) is True
    assert store.get("ns", "k") == 3


def test_take_is_single_use(store):
    store.put("state", "s", {"verifier": "v"}, ttl=60)
    assert store.take("state", "s") == {"verifier": "v"}
    assert store.take("state", "s") is None
    assert store.get("state", "s") is None


def test_take_races_have_one_winner(store):
    for i in range(20):
        store.put("state", f"s{i}", i, ttl=60)
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for i in range(20):
            v = store.take("state", f"s{i}")
            if v is not None:
                wins.append(v)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(20))


def test_compare_and_set(store):
    assert store.compare_and_set("d", "k", None, {"v": 1}, ttl=60) is True
    assert store.compare_and_set("d", "k", None, {"v": 2}, ttl=60) is False
    assert store.compare_and_set("d", "k", {"v": 9}, {"v": 2}, ttl=60) is False
    assert store.compare_and_set("d", "k", {"v": 1}, {"v": 2}, ttl=60) is True
    assert store.get("d", "k") == {"v": 2}


def test_compare_and_set_ignores_key_order(store):
    store.put("d", "k", {"a": 1, "b": 2}, ttl=60)
    assert store.compare_and_set("d", "k", {"b": 2, "a": 1}, {"a": 3}, ttl=60) is True


def test_lock_is_exclusive_and_released(store, clock):
    with store.lock("refresh", "sid", lease=30, wait=0):
        with pytest.raises(LockTimeout):
            with store.lock("refresh", "sid", lease=30, wait=1):
                pass
        with store.lock("refresh", "other", lease=30, wait=0):
            pass  # another key is independent
    with store.lock("refresh", "sid", lease=30, wait=0):
        pass


def test_lock_lease_expires_after_a_crash(store, clock):
    cm = store.lock("refresh", "sid", lease=5, wait=0)
    cm.__enter__()  # a holder that never releases (a crashed process)
    clock.advance(6)
    with store.lock("refresh", "sid", lease=5, wait=0):
        pass


def test_lock_serialises_threads(tmp_path):
    s = SQLiteStore(str(tmp_path / "lock.db"))
    inside = []
    overlap = []

    def worker() -> None:
        for _ in range(10):
            with s.lock("refresh", "sid", lease=10, wait=10):
                inside.append(1)
                if len(inside) > 1:
                    overlap.append(1)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert not overlap


def test_two_store_objects_share_one_sqlite_file(tmp_path, clock):
    a = SQLiteStore(str(tmp_path / "shared.db"), clock=clock)
    b = SQLiteStore(str(tmp_path / "shared.db"), clock=clock)
    a.put("ns", "k", 1, ttl=60)
    assert b.take("ns", "k") == 1
    assert a.get("ns", "k") is None
    with a.lock("refresh", "x", lease=30, wait=0):
        with pytest.raises(LockTimeout):
            with b.lock("refresh", "x", lease=30, wait=0):
                pass
    a.close()
    b.close()


def test_purge_expired(store, clock):
    store.put("ns", "old", 1, ttl=1)
    store.put("ns", "new", 2, ttl=100)
    clock.advance(2)
    assert store.purge_expired() == 1
    assert store.get("ns", "new") == 2


def test_open_store_urls(tmp_path):
    s = open_store("sqlite:///:memory:")
    assert isinstance(s, SQLiteStore)
    s.close()
    f = open_store(f"sqlite:///{tmp_path}/x.db")
    f.put("a", "b", 1, ttl=5)
    f.close()
    assert (tmp_path / "x.db").exists()
    with pytest.raises(StoreError):
        open_store("redis://localhost")
