"""Draft store: keyed by author/patient/order (not the launch), author-only, expiring, never resurrected."""

from __future__ import annotations

import pytest

from smart_app.drafts import (DraftAlreadyWritten, DraftError, DraftKey, DraftNotYours, DraftStore, NS_DRAFT,
                              new_draft_id)
from smart_app.store import SQLiteStore

ISS = "http://127.0.0.1:1/fhir"
SAM = DraftKey(ISS, "Practitioner/lmt-sam-reyes", "pat-1", "ServiceRequest/o1")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def drafts(request, clock: Clock):
    """The same contract on every backend the app can run on (tests/unit/test_store.py does the same for the
    raw Store): SQLite in memory, and a PostgreSQL cluster started for the test run, each test under its own
    table prefix."""
    if request.param == "postgres":
        from smart_app.store import PostgresStore
        from tests.fixtures.postgres import unique_prefix

        dsn = request.getfixturevalue("postgres_dsn")
        store = PostgresStore(dsn, table_prefix=unique_prefix(), clock=clock)
    else:
        store = SQLiteStore(":memory:", clock=clock)
    yield DraftStore(store, ttl=3600, clock=clock)
    store.close()


def test_save_then_load_keeps_fields_and_one_draft_id(drafts, clock):
    first = drafts.save(SAM, {"subjective": "neck stiff", "sites": ["45048000"], "csrf_token": "x"})
    clock.t += 5
    second = drafts.save(SAM, {"subjective": "neck stiff, better"}, draft_id=first["draft_id"])
    assert second["draft_id"] == first["draft_id"]
    loaded = drafts.load(SAM)
    assert loaded["fields"] == {"subjective": "neck stiff, better"}
    assert loaded["saves"] == 2 and loaded["saved_at"] == clock.t and loaded["created_at"] == clock.t - 5


def test_the_page_given_draft_id_is_used_for_a_new_draft(drafts):
    did = new_draft_id()
    assert drafts.save(SAM, {"plan": "x"}, draft_id=did)["draft_id"] == did


@pytest.mark.parametrize("other", [
    DraftKey(ISS, "Practitioner/dr-ada-grey", "pat-1", "ServiceRequest/o1"),  # another user, same patient + order
    DraftKey(ISS, "Practitioner/lmt-sam-reyes", "pat-2", "ServiceRequest/o1"),
    DraftKey(ISS, "Practitioner/lmt-sam-reyes", "pat-1", "ServiceRequest/o2"),
    DraftKey("http://other.example/fhir", "Practitioner/lmt-sam-reyes", "pat-1", "ServiceRequest/o1"),
])
def test_other_keys_do_not_see_the_draft(drafts, other):
    drafts.save(SAM, {"subjective": "private"})
    assert drafts.load(other) is None


def test_a_record_under_the_key_that_names_another_author_is_refused(drafts):
    rec = drafts.save(SAM, {"subjective": "private"})
    intruder = DraftKey(ISS, "Practitioner/dr-ada-grey", "pat-1", "ServiceRequest/o1")
    # simulate a collision or a tampered store: the intruder's key points at Sam's record
    drafts.store.put(NS_DRAFT, intruder.storage_key, rec, 60)
    with pytest.raises(DraftNotYours):
        drafts.load(intruder)
    with pytest.raises(DraftNotYours):  # the autosave overwrite checks too
        drafts.save(intruder, {"subjective": "overwrite"}, draft_id=rec["draft_id"])
    assert drafts.load(SAM)["fields"] == {"subjective": "private"}


def test_drafts_expire(drafts, clock):
    drafts.save(SAM, {"plan": "x"})
    clock.t += 3601
    assert drafts.load(SAM) is None


def test_written_draft_is_deleted_and_cannot_come_back(drafts):
    rec = drafts.save(SAM, {"plan": "x"})
    drafts.mark_written(SAM, rec["draft_id"], result={"procedure": "Procedure/1"})
    assert drafts.load(SAM) is None
    with pytest.raises(DraftAlreadyWritten):  # a late keepalive autosave from the closing tab
        drafts.save(SAM, {"plan": "x"}, draft_id=rec["draft_id"])
    assert drafts.load(SAM) is None
    assert drafts.save(SAM, {"plan": "next session"})["draft_id"] != rec["draft_id"]


def test_a_second_draft_id_for_the_same_order_is_refused(drafts):
    rec = drafts.save(SAM, {"plan": "tab one"})
    with pytest.raises(DraftError) as err:
        drafts.save(SAM, {"plan": "tab two"}, draft_id=new_draft_id())
    assert err.value.code == "draft-replaced"
    assert drafts.load(SAM)["draft_id"] == rec["draft_id"]


def test_discard_only_the_shown_draft(drafts):
    rec = drafts.save(SAM, {"plan": "x"})
    assert not drafts.discard(SAM, new_draft_id())
    assert drafts.discard(SAM, rec["draft_id"])
    assert drafts.load(SAM) is None


@pytest.mark.parametrize("fields,code", [
    ({"Bad Name": "x"}, "draft-bad-field"),
    ({"plan": 3}, "draft-bad-field"),
    ({"plan": "x" * 20_001}, "draft-too-big"),
    ({f"f{i}": "x" for i in range(61)}, "draft-too-big"),
])
def test_fields_are_checked(drafts, fields, code):
    with pytest.raises(DraftError) as err:
        drafts.save(SAM, fields)
    assert err.value.code == code


def test_bad_draft_id_and_missing_author():
    with pytest.raises(DraftError):
        DraftKey(ISS, "", "pat-1", "ServiceRequest/o1")
    d = DraftStore(SQLiteStore(":memory:"), ttl=60)
    with pytest.raises(DraftError):
        d.save(SAM, {}, draft_id="../../etc")


def test_drafts_survive_a_new_store_on_the_same_file(tmp_path):
    path = str(tmp_path / "app.db")
    first = DraftStore(SQLiteStore(path), ttl=600)
    rec = first.save(SAM, {"subjective": "kept"})
    first.store.close()
    again = DraftStore(SQLiteStore(path), ttl=600)
    assert again.load(SAM)["draft_id"] == rec["draft_id"]
