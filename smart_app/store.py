"""Server-side storage for the app: launch state, launch sessions (tokens), and later session-note drafts.

Tokens never go to the browser (SMART AL "App protection"; Flask's own session is a signed, not encrypted,
cookie). The browser holds only opaque random ids; everything else lives here.

The ``Store`` contract, in a few operations every backend implements atomically:

* ``put(ns, key, value, ttl)`` / ``get(ns, key)`` / ``delete(ns, key)``: a namespaced key → JSON value that
  disappears after ``ttl`` seconds (expired values read as absent).
* ``add(ns, key, value, ttl) -> bool``: insert only when absent (or expired).
* ``take(ns, key)``: get and delete in one step, so a single-use value (OAuth ``state``) can be used once even when
  two requests race (AL "App protection": state is validated once).
* ``compare_and_set(ns, key, expected, new, ttl) -> bool``: replace only if the stored value still equals
  ``expected`` (optimistic concurrency for drafts).
* ``lock(ns, key, lease=..., wait=...)``: a context manager holding a lease lock shared by every process using the
  same store, for the single-flight token refresh (reference row 33: never use a refresh token twice).

Backends: ``SQLiteStore`` (default; one process, or several on one machine via the file) and ``PostgresStore``
(several app instances behind a load balancer). ``open_store(url)`` picks one from a URL:
``sqlite:///relative/or/absolute/path.db``, ``sqlite:////abs/path.db``, ``sqlite:///:memory:``,
``postgresql://user:pass@host/db``.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import orjson

from fhir_massage.errors import MassageError

__all__ = ["Store", "StoreError", "LockTimeout", "SQLiteStore", "PostgresStore", "open_store"]


class StoreError(MassageError):
    code = "store"


class LockTimeout(StoreError):
    code = "store-lock-timeout"
    retryable = True


class Store(Protocol):
    def get(self, ns: str, key: str) -> Any | None: ...

    def put(self, ns: str, key: str, value: Any, ttl: float) -> None: ...

    def add(self, ns: str, key: str, value: Any, ttl: float) -> bool: ...

    def take(self, ns: str, key: str) -> Any | None: ...

    def delete(self, ns: str, key: str) -> None: ...

    def compare_and_set(self, ns: str, key: str, expected: Any, new: Any, ttl: float) -> bool: ...

    def lock(self, ns: str, key: str, *, lease: float = 30.0, wait: float = 30.0) -> contextlib.AbstractContextManager[None]: ...

    def purge_expired(self) -> int: ...

    def close(self) -> None: ...


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _load(text: Any) -> Any:
    if text is None:
        return None
    return orjson.loads(text)  # PostgresStore selects value::text, so both backends hand over JSON text


def _canon(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


class _LeaseLockMixin:
    """A lock row per (ns, key) with an owner token and an expiry: any process sharing the database sees it, and
    a crashed holder's lease runs out instead of blocking forever."""

    _clock: Callable[[], float]
    _sleep: Callable[[float], None]

    def _try_lock(self, name: str, owner: str, lease: float) -> bool:  # pragma: no cover - per backend
        raise NotImplementedError

    def _unlock(self, name: str, owner: str) -> None:  # pragma: no cover - per backend
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, ns: str, key: str, *, lease: float = 30.0, wait: float = 30.0) -> Iterator[None]:
        name = f"{ns}\x1f{key}"
        owner = secrets.token_hex(16)
        deadline = self._clock() + wait
        delay = 0.005
        while not self._try_lock(name, owner, lease):
            if self._clock() >= deadline:
                raise LockTimeout("Another request is still busy with this session; try again in a moment.")
            self._sleep(delay)
            delay = min(delay * 2, 0.1)
        try:
            yield
        finally:
            self._unlock(name, owner)


class SQLiteStore(_LeaseLockMixin):
    """SQLite backend. One connection per store guarded by a lock (SQLite serialises writers anyway); the file may
    be shared by several processes on one machine (WAL, busy timeout). ``:memory:`` is for tests and the demo."""

    def __init__(self, path: str = ":memory:", *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self._clock = clock
        self._sleep = sleep
        self._mutex = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        with self._mutex:
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
                               " expires_at REAL NOT NULL, PRIMARY KEY (ns, key))")
            self._conn.execute("CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL,"
                               " expires_at REAL NOT NULL)")

    def _exec(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._mutex:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"The app's session store failed ({type(exc).__name__}).") from exc

    def get(self, ns: str, key: str) -> Any | None:
        rows = self._exec("SELECT value FROM kv WHERE ns=? AND key=? AND expires_at>?", (ns, key, self._clock()))
        return _load(rows[0][0]) if rows else None

    def put(self, ns: str, key: str, value: Any, ttl: float) -> None:
        self._exec("INSERT INTO kv (ns, key, value, expires_at) VALUES (?,?,?,?) ON CONFLICT (ns, key) DO UPDATE "
                   "SET value=excluded.value, expires_at=excluded.expires_at",
                   (ns, key, _dump(value), self._clock() + ttl))

    def add(self, ns: str, key: str, value: Any, ttl: float) -> bool:
        now = self._clock()
        rows = self._exec("INSERT INTO kv (ns, key, value, expires_at) VALUES (?,?,?,?) ON CONFLICT (ns, key) DO UPDATE "
                          "SET value=excluded.value, expires_at=excluded.expires_at WHERE kv.expires_at<=? RETURNING 1",
                          (ns, key, _dump(value), now + ttl, now))
        return bool(rows)

    def take(self, ns: str, key: str) -> Any | None:
        rows = self._exec("DELETE FROM kv WHERE ns=? AND key=? RETURNING value, expires_at", (ns, key))
        if not rows or rows[0][1] <= self._clock():
            return None
        return _load(rows[0][0])

    def delete(self, ns: str, key: str) -> None:
        self._exec("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))

    def compare_and_set(self, ns: str, key: str, expected: Any, new: Any, ttl: float) -> bool:
        now = self._clock()
        with self._mutex:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._conn.execute("SELECT value FROM kv WHERE ns=? AND key=? AND expires_at>?",
                                              (ns, key, now)).fetchall()
                    current = _load(rows[0][0]) if rows else None
                    if _canon(current) != _canon(expected):
                        self._conn.execute("COMMIT")
                        return False
                    self._conn.execute("INSERT INTO kv (ns, key, value, expires_at) VALUES (?,?,?,?) ON CONFLICT "
                                       "(ns, key) DO UPDATE SET value=excluded.value, expires_at=excluded.expires_at",
                                       (ns, key, _dump(new), now + ttl))
                    self._conn.execute("COMMIT")
                    return True
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"The app's session store failed ({type(exc).__name__}).") from exc

    def _try_lock(self, name: str, owner: str, lease: float) -> bool:
        now = self._clock()
        rows = self._exec("INSERT INTO locks (name, owner, expires_at) VALUES (?,?,?) ON CONFLICT (name) DO UPDATE "
                          "SET owner=excluded.owner, expires_at=excluded.expires_at WHERE locks.expires_at<=? "
                          "RETURNING owner", (name, owner, now + lease, now))
        return bool(rows) and rows[0][0] == owner

    def _unlock(self, name: str, owner: str) -> None:
        self._exec("DELETE FROM locks WHERE name=? AND owner=?", (name, owner))

    def purge_expired(self) -> int:
        now = self._clock()
        with self._mutex:
            n = self._conn.execute("DELETE FROM kv WHERE expires_at<=?", (now,)).rowcount
            self._conn.execute("DELETE FROM locks WHERE expires_at<=?", (now,))
        return n

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


class PostgresStore(_LeaseLockMixin):
    """PostgreSQL backend (psycopg 3) for several app instances. One autocommit connection per store, guarded by a
    lock; every operation is one statement, so atomicity comes from PostgreSQL itself (``DELETE ... RETURNING`` for
    take, ``INSERT ... ON CONFLICT ... WHERE`` for add and the lease locks, ``UPDATE ... WHERE value = expected``
    for compare-and-set). Expiry uses the app's clock so that tests can move time; app hosts keep NTP time."""

    def __init__(self, dsn: str, *, table_prefix: str = "fm_", clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import psycopg

        self._psycopg = psycopg
        self.dsn = dsn
        self._clock = clock
        self._sleep = sleep
        self._kv = f"{table_prefix}kv"
        self._locks = f"{table_prefix}locks"
        if not self._kv.replace("_", "").isalnum():
            raise StoreError("table_prefix may hold only letters, digits and underscores.")
        self._mutex = threading.RLock()
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._exec(f"CREATE TABLE IF NOT EXISTS {self._kv} (ns TEXT NOT NULL, key TEXT NOT NULL, value JSONB NOT NULL,"
                   " expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (ns, key))")
        self._exec(f"CREATE TABLE IF NOT EXISTS {self._locks} (name TEXT PRIMARY KEY, owner TEXT NOT NULL,"
                   " expires_at DOUBLE PRECISION NOT NULL)")

    def _exec(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._mutex:
            for attempt in (1, 2):
                try:
                    cur = self._conn.execute(sql, params)
                    return cur.fetchall() if cur.description else []
                except self._psycopg.OperationalError as exc:
                    # a dropped connection (server restart, idle timeout): reconnect once
                    if attempt == 2 or not self._conn.closed:
                        raise StoreError(f"The app's session store failed ({type(exc).__name__}).") from exc
                    self._conn = self._psycopg.connect(self.dsn, autocommit=True)
                except self._psycopg.Error as exc:
                    raise StoreError(f"The app's session store failed ({type(exc).__name__}).") from exc
        return []  # pragma: no cover

    def get(self, ns: str, key: str) -> Any | None:
        rows = self._exec(f"SELECT value::text FROM {self._kv} WHERE ns=%s AND key=%s AND expires_at>%s",
                          (ns, key, self._clock()))
        return _load(rows[0][0]) if rows else None

    def put(self, ns: str, key: str, value: Any, ttl: float) -> None:
        self._exec(f"INSERT INTO {self._kv} (ns, key, value, expires_at) VALUES (%s,%s,%s::jsonb,%s) ON CONFLICT "
                   "(ns, key) DO UPDATE SET value=excluded.value, expires_at=excluded.expires_at",
                   (ns, key, _dump(value), self._clock() + ttl))

    def add(self, ns: str, key: str, value: Any, ttl: float) -> bool:
        now = self._clock()
        rows = self._exec(f"INSERT INTO {self._kv} AS t (ns, key, value, expires_at) VALUES (%s,%s,%s::jsonb,%s) "
                          "ON CONFLICT (ns, key) DO UPDATE SET value=excluded.value, expires_at=excluded.expires_at "
                          "WHERE t.expires_at<=%s RETURNING 1", (ns, key, _dump(value), now + ttl, now))
        return bool(rows)

    def take(self, ns: str, key: str) -> Any | None:
        rows = self._exec(f"DELETE FROM {self._kv} WHERE ns=%s AND key=%s RETURNING value::text, expires_at",
                          (ns, key))
        if not rows or rows[0][1] <= self._clock():
            return None
        return _load(rows[0][0])

    def delete(self, ns: str, key: str) -> None:
        self._exec(f"DELETE FROM {self._kv} WHERE ns=%s AND key=%s", (ns, key))

    def compare_and_set(self, ns: str, key: str, expected: Any, new: Any, ttl: float) -> bool:
        now = self._clock()
        if expected is None:
            return self.add(ns, key, new, ttl)
        rows = self._exec(f"UPDATE {self._kv} SET value=%s::jsonb, expires_at=%s WHERE ns=%s AND key=%s AND "
                          "expires_at>%s AND value=%s::jsonb RETURNING 1",
                          (_dump(new), now + ttl, ns, key, now, _dump(expected)))
        return bool(rows)

    def _try_lock(self, name: str, owner: str, lease: float) -> bool:
        now = self._clock()
        rows = self._exec(f"INSERT INTO {self._locks} AS l (name, owner, expires_at) VALUES (%s,%s,%s) ON CONFLICT "
                          "(name) DO UPDATE SET owner=excluded.owner, expires_at=excluded.expires_at "
                          "WHERE l.expires_at<=%s RETURNING owner", (name, owner, now + lease, now))
        return bool(rows) and rows[0][0] == owner

    def _unlock(self, name: str, owner: str) -> None:
        self._exec(f"DELETE FROM {self._locks} WHERE name=%s AND owner=%s", (name, owner))

    def purge_expired(self) -> int:
        now = self._clock()
        rows = self._exec(f"DELETE FROM {self._kv} WHERE expires_at<=%s RETURNING 1", (now,))
        self._exec(f"DELETE FROM {self._locks} WHERE expires_at<=%s", (now,))
        return len(rows)

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    def __repr__(self) -> str:
        return "PostgresStore(***)"  # the DSN may hold a password


def open_store(url: str, **kwargs: Any) -> Store:
    """A store from a URL (see the module docstring)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return SQLiteStore(path or ":memory:", **kwargs)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, **kwargs)
    raise StoreError("STORE_URL must start with sqlite:/// or postgresql://.")
