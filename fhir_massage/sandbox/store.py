"""SQLite storage for the sandbox: current versions, full history, and the search index.

One connection guarded by one re-entrant lock: the WSGI server is threaded, SQLite in-memory databases are
per-connection, and a sandbox needs correctness far more than write concurrency. ``transaction()`` holds the lock
for the whole unit of work, so a FHIR transaction Bundle is one SQLite transaction (all or nothing) and nested
units become SAVEPOINTs (a batch entry that fails rolls back alone).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import orjson

from fhir_massage.sandbox.search import index_rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
  rtype TEXT NOT NULL, rid TEXT NOT NULL, version INTEGER NOT NULL, lu REAL NOT NULL, lu_text TEXT NOT NULL,
  deleted INTEGER NOT NULL DEFAULT 0, body BLOB, PRIMARY KEY (rtype, rid));
CREATE TABLE IF NOT EXISTS history (
  rtype TEXT NOT NULL, rid TEXT NOT NULL, version INTEGER NOT NULL, lu_text TEXT NOT NULL,
  deleted INTEGER NOT NULL DEFAULT 0, method TEXT NOT NULL, body BLOB, PRIMARY KEY (rtype, rid, version));
CREATE TABLE IF NOT EXISTS search_index (
  rtype TEXT NOT NULL, rid TEXT NOT NULL, param TEXT NOT NULL, sys TEXT, code TEXT, sval TEXT, raw TEXT,
  lo REAL, hi REAL, rref TEXT, rtarget TEXT, rtid TEXT, num REAL);
-- Indexes shaped like the searches (search.py, service.py) and covering them, so the search part reads index pages
-- only. The search_index ones are partial: each holds only the rows of the kinds that fill its columns (token,
-- reference, date, string, quantity), which keeps a write's index upkeep at what the older, narrower indexes cost; search.py
-- adds the matching "col IS NOT NULL" term so SQLite may use them. Older sandboxes had other indexes (among them
-- ix_res_type_lu on (rtype, deleted, lu), which made SQLite scan every resource of the type even when a parameter
-- named a few): they are dropped, so a data directory written by an older sandbox gets the new plans too.
DROP INDEX IF EXISTS ix_res_type_lu;
DROP INDEX IF EXISTS ix_si_code;
DROP INDEX IF EXISTS ix_si_ref;
DROP INDEX IF EXISTS ix_si_rtid;
DROP INDEX IF EXISTS ix_si_sval;
DROP INDEX IF EXISTS ix_si_lo;
-- whole-type searches in the default order (_lastUpdated, id): walked in order, no sort
CREATE INDEX IF NOT EXISTS ix_res_order ON resources (rtype, lu, rid, deleted);
-- searches narrowed by parameters: (rtype, rid IN (...)) probes that read lu/deleted without the row
CREATE INDEX IF NOT EXISTS ix_res_keys ON resources (rtype, rid, deleted, lu);
CREATE INDEX IF NOT EXISTS ix_si_owner ON search_index (rtype, rid, param);
CREATE INDEX IF NOT EXISTS ix_si_code2 ON search_index (rtype, param, code, sys, rid) WHERE code IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_si_ref2 ON search_index (rtype, param, rref, rid) WHERE rref IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_si_rtid2 ON search_index (rtype, param, rtid, rtarget, rid) WHERE rtid IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_si_sval2 ON search_index (rtype, param, sval, rid) WHERE sval IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_si_lo2 ON search_index (rtype, param, lo, hi, rid) WHERE lo IS NOT NULL;
CREATE INDEX IF NOT EXISTS ix_si_num ON search_index (rtype, param, num, rid) WHERE num IS NOT NULL;
"""


# Ids per "rid IN (...)" statement: well under SQLite's limit on bound variables (32,766 since 3.32).
_IN_CHUNK = 500


@dataclass(frozen=True)
class Record:
    rtype: str
    rid: str
    version: int
    last_updated: str
    deleted: bool
    body: dict[str, Any] | None


def now_instant() -> tuple[float, str]:
    now = datetime.now(timezone.utc)
    return now.timestamp(), now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Store:
    def __init__(self, path: Path | None = None) -> None:
        target = str(path) if path is not None else ":memory:"
        self._conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._depth = 0
        if path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._last_ts = 0.0
        self._generation = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            depth = self._depth
            name = f"sp{depth}"
            self._conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if depth == 0:
                    self._conn.execute("ROLLBACK")
                    self._generation += 1
                else:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                raise
            self._depth -= 1
            if depth == 0:
                self._conn.execute("COMMIT")
                self._generation += 1
            else:
                self._conn.execute(f"RELEASE {name}")

    @property
    def generation(self) -> int:
        """Changes whenever a unit of work ends (committed or rolled back): data read at one generation is still
        the data while it stays the same. Read it under snapshot()."""
        return self._generation

    @property
    def in_transaction(self) -> bool:
        """True inside transaction() on this thread (the lock is re-entrant; other threads wait for it)."""
        return self._depth > 0

    def query(self, sql: str, args: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads that see the same data: every write goes through this one connection under this lock, so
        holding it keeps writers out (a search's page and its total agree)."""
        with self._lock:
            yield

    # -- reads -------------------------------------------------------------------------------------------------

    def get(self, rtype: str, rid: str) -> Record | None:
        rows = self.query(
            "SELECT version, lu_text, deleted, body FROM resources WHERE rtype = ? AND rid = ?", (rtype, rid)
        )
        if not rows:
            return None
        version, lu, deleted, body = rows[0]
        return Record(rtype, rid, version, lu, bool(deleted), orjson.loads(body) if body else None)

    def get_many(self, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The current, not deleted resources among ``keys``, in the order of ``keys`` (absent ones left out)."""
        return [orjson.loads(body) for _, body in self.get_many_raw(keys)]

    def get_many_raw(self, keys: list[tuple[str, str]]) -> list[tuple[tuple[str, str], bytes]]:
        """Like get_many, as (key, stored JSON) pairs: one query per type, however many keys."""
        by_type: dict[str, list[str]] = {}
        for rtype, rid in keys:
            by_type.setdefault(rtype, []).append(rid)
        found: dict[tuple[str, str], bytes] = {}
        with self._lock:
            for rtype, rids in by_type.items():
                for rid, body in self.bodies(rtype, rids):
                    found[(rtype, rid)] = body
        return [(key, found[key]) for key in keys if key in found]

    def bodies(self, rtype: str, rids: list[str]) -> list[tuple[str, bytes]]:
        """(id, JSON body) of the current, not deleted resources of one type among ``rids``, in no set order."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for start in range(0, len(rids), _IN_CHUNK):
                chunk = list(dict.fromkeys(rids[start : start + _IN_CHUNK]))
                out += self._conn.execute(
                    f"SELECT rid, body FROM resources WHERE rtype = ? AND rid IN ({','.join('?' * len(chunk))})"
                    " AND deleted = 0 AND body IS NOT NULL",
                    [rtype, *chunk],
                ).fetchall()
        return out

    def get_version(self, rtype: str, rid: str, version: int) -> Record | None:
        rows = self.query(
            "SELECT lu_text, deleted, body FROM history WHERE rtype = ? AND rid = ? AND version = ?",
            (rtype, rid, version),
        )
        if not rows:
            return None
        lu, deleted, body = rows[0]
        return Record(rtype, rid, version, lu, bool(deleted), orjson.loads(body) if body else None)

    def history(self, rtype: str, rid: str) -> list[tuple[Record, str]]:
        rows = self.query(
            "SELECT version, lu_text, deleted, body, method FROM history WHERE rtype = ? AND rid = ?"
            " ORDER BY version DESC",
            (rtype, rid),
        )
        return [
            (Record(rtype, rid, v, lu, bool(d), orjson.loads(b) if b else None), method) for v, lu, d, b, method in rows
        ]

    # -- writes (call inside transaction()) --------------------------------------------------------------------

    def _stamp(self) -> tuple[float, str]:
        # Strictly increasing timestamps so _lastUpdated sorting and ranges are deterministic.
        ts, text = now_instant()
        if ts <= self._last_ts:
            ts = self._last_ts + 0.001
            text = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._last_ts = ts
        return ts, text

    def put(self, resource: dict[str, Any], method: str, compartment: set[str] | None = None) -> dict[str, Any]:
        """Store a new version of ``resource`` (its id set); fills meta.versionId/lastUpdated and re-indexes."""
        rtype, rid = resource["resourceType"], resource["id"]
        with self.transaction():
            current = self.get(rtype, rid)
            version = current.version + 1 if current else 1
            ts, text = self._stamp()
            meta = dict(resource.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = text
            resource = {**resource, "meta": meta}
            body = orjson.dumps(resource)
            self._conn.execute(
                "INSERT OR REPLACE INTO resources (rtype, rid, version, lu, lu_text, deleted, body)"
                " VALUES (?, ?, ?, ?, ?, 0, ?)",
                (rtype, rid, version, ts, text, body),
            )
            self._conn.execute(
                "INSERT INTO history (rtype, rid, version, lu_text, deleted, method, body) VALUES (?, ?, ?, ?, 0, ?, ?)",
                (rtype, rid, version, text, method, body),
            )
            self._conn.execute("DELETE FROM search_index WHERE rtype = ? AND rid = ?", (rtype, rid))
            self._conn.executemany(
                "INSERT INTO search_index (rtype, rid, param, sys, code, sval, raw, lo, hi, rref, rtarget, rtid, num)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(rtype, rid, *row) for row in index_rows(resource, compartment)],
            )
        return resource

    def delete(self, rtype: str, rid: str) -> Record | None:
        """Mark deleted (a new history version with no body); None if there was nothing to delete."""
        with self.transaction():
            current = self.get(rtype, rid)
            if current is None or current.deleted:
                return None
            ts, text = self._stamp()
            version = current.version + 1
            self._conn.execute(
                "UPDATE resources SET version = ?, lu = ?, lu_text = ?, deleted = 1, body = NULL"
                " WHERE rtype = ? AND rid = ?",
                (version, ts, text, rtype, rid),
            )
            self._conn.execute(
                "INSERT INTO history (rtype, rid, version, lu_text, deleted, method, body)"
                " VALUES (?, ?, ?, ?, 1, 'DELETE', NULL)",
                (rtype, rid, version, text),
            )
            self._conn.execute("DELETE FROM search_index WHERE rtype = ? AND rid = ?", (rtype, rid))
            return Record(rtype, rid, version, text, True, None)

    def wipe(self) -> None:
        with self.transaction():
            for table in ("resources", "history", "search_index"):
                self._conn.execute(f"DELETE FROM {table}")
