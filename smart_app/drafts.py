"""Server-side drafts of session notes (and later other forms): nothing a therapist types is lost.

A draft lives in the app's own store (smart_app/store.py: SQLite by default, PostgreSQL for several instances), NOT
in the launch session and not in the browser. Its key is (EHR iss, author fhirUser, patient, plan), so it
survives everything that ends a launch: the EHR answering 500 or timing out on submit, the access token expiring
mid-note, the tab closing, the app restarting (with a file-backed store). The therapist opens the patient again
(a new launch), the same key finds the same draft, and submitting it writes it once: every identifier of the
visit transaction derives from the draft's ``draft_id`` (builders.session), which the draft keeps.

A session note is written per VISIT against the whole plan (the per-technique orders of one
``ServiceRequest.requisition``), so its draft is keyed by the plan (``DraftKey.for_plan``: subject
``plan:<requisition key>``, or ``plan:ServiceRequest/<id>`` for an order without a requisition): opening the plan
from any of its orders finds the same draft. Drafts keyed by an order (before visit notes) are not migrated;
they expire with ``DRAFT_TTL``.

Rules:
* only the author reads or overwrites a draft: the author is part of the key AND is stored in the record and
  compared on every read and every save (a key collision or a tampered store must not hand one clinician's notes
  to another);
* a draft is deleted only after the EHR confirmed the write (``mark_written``); the draft id then goes on a
  "written" list for the draft's lifetime, so a late autosave (a ``keepalive`` request sent as the tab closed)
  cannot bring a written note back as a draft;
* drafts expire after ``DRAFT_TTL`` seconds (config), counted from the last save.

The store key is a SHA-256 of the parts: the store holds no patient id or user in its keys (values do hold the
note; the store is server-side and never exposed).
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fhir_massage.errors import MassageError

__all__ = ["DraftKey", "DraftStore", "DraftError", "DraftNotYours", "DraftAlreadyWritten", "NS_DRAFT",
           "NS_WRITTEN", "new_draft_id", "clean_fields"]

NS_DRAFT = "draft"
NS_WRITTEN = "draft-written"
MAX_FIELDS = 60
MAX_VALUE = 20_000  # characters per field (a SOAP section is a few hundred)
MAX_LIST = 60
_DRAFT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_FIELD = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class DraftError(MassageError):
    code = "draft"


class DraftNotYours(DraftError):
    code = "draft-not-yours"


class DraftAlreadyWritten(DraftError):
    code = "draft-written"


def new_draft_id() -> str:
    return str(uuid.uuid4())


def is_draft_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_DRAFT_ID.match(value))


@dataclass(frozen=True)
class DraftKey:
    """Who wrote the draft, for which patient and plan (or other subject), on which EHR."""

    iss: str
    author: str  # the fhirUser reference, e.g. "Practitioner/lmt-sam-reyes"
    patient: str  # patient id
    subject: str  # what the draft is for, e.g. "plan:<requisition>" (see for_plan)

    @classmethod
    def for_plan(cls, iss: str, author: str, patient: str, plan_key: str) -> "DraftKey":
        """The visit note's draft for the plan ``plan_key`` (plan_view.requisition_of, or the order reference of
        an order without a requisition)."""
        return cls(iss, author, patient, f"plan:{plan_key}" if plan_key else "")

    def __post_init__(self) -> None:
        for name in ("iss", "author", "patient", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise DraftError("A draft needs a known user, patient and plan; the EHR did not say who is signed "
                                 "in, so drafts cannot be kept for this launch.", code="draft-no-author")

    @property
    def storage_key(self) -> str:
        raw = "\x1f".join((self.iss, self.author, self.patient, self.subject))
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def owns(self, record: Mapping[str, Any]) -> bool:
        return (record.get("iss"), record.get("author"), record.get("patient"), record.get("subject")) == \
            (self.iss, self.author, self.patient, self.subject)


def clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Keep form fields a draft may hold: short lower-case names, string or list-of-string values, bounded size.
    Raises DraftError (a 400 for the web layer) for anything else rather than silently dropping text."""
    out: dict[str, Any] = {}
    if len(fields) > MAX_FIELDS:
        raise DraftError("The draft has too many fields.", code="draft-too-big")
    for name, value in fields.items():
        if name in ("csrf_token", "action", "draft_id"):
            continue
        if not isinstance(name, str) or not _FIELD.match(name):
            raise DraftError("The draft has a field the app does not know.", code="draft-bad-field")
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LIST or not all(isinstance(v, str) for v in values):
            raise DraftError("The draft has a field the app cannot keep.", code="draft-bad-field")
        if any(len(v) > MAX_VALUE for v in values):
            raise DraftError(f"A field of the note is longer than {MAX_VALUE} characters; shorten it.",
                             code="draft-too-big")
        out[name] = list(values) if isinstance(value, (list, tuple)) else value
    return out


class DraftStore:
    """Drafts on top of a smart_app.store Store. ``ttl``: seconds a draft lives after its last save."""

    def __init__(self, store: Any, ttl: float, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl = float(ttl)
        self._clock = clock

    def load(self, key: DraftKey) -> dict[str, Any] | None:
        """The draft, or None. A record that is not the key's author's is never returned."""
        rec = self.store.get(NS_DRAFT, key.storage_key)
        if rec is None:
            return None
        if not key.owns(rec):
            raise DraftNotYours("This draft belongs to someone else.")
        return rec

    def save(self, key: DraftKey, fields: Mapping[str, Any], *, draft_id: str | None = None) -> dict[str, Any]:
        """Create or overwrite the draft with ``fields``. ``draft_id``: the id the page was showing (the browser
        sends it back); a draft id the EHR already confirmed is refused (DraftAlreadyWritten)."""
        if draft_id is not None and not is_draft_id(draft_id):
            raise DraftError("The draft id sent with the note is not valid; reload the page.", code="draft-bad-id")
        cleaned = clean_fields(fields)
        if draft_id is not None and self.written(draft_id):
            raise DraftAlreadyWritten("This note was already written to the chart; it is no longer a draft. Reload "
                                      "the page to start a new note.")
        with self.store.lock(NS_DRAFT, key.storage_key, lease=10.0, wait=10.0):
            current = self.load(key)
            now = self._clock()
            if current is not None and draft_id is not None and current["draft_id"] != draft_id:
                # Another draft for the same plan (a second tab started after this one's note was written):
                # keep the newer one, never merge two notes into one.
                raise DraftError("Another draft for this plan was saved in the meantime (another tab?). Reload "
                                 "the page to continue with it.", code="draft-replaced")
            rec = {
                "draft_id": (current or {}).get("draft_id") or draft_id or new_draft_id(),
                "iss": key.iss, "author": key.author, "patient": key.patient, "subject": key.subject,
                "fields": cleaned,
                "created_at": (current or {}).get("created_at") or now,
                "saved_at": now,
                "saves": int((current or {}).get("saves") or 0) + 1,
            }
            self.store.put(NS_DRAFT, key.storage_key, rec, self.ttl)
            return rec

    def written(self, draft_id: str) -> bool:
        return self.store.get(NS_WRITTEN, draft_id) is not None

    def mark_written(self, key: DraftKey, draft_id: str, *, result: Mapping[str, Any] | None = None) -> None:
        """Call only after the EHR confirmed the write: remember the id, then delete the draft."""
        self.store.put(NS_WRITTEN, draft_id, {"at": self._clock(), **(dict(result or {}))}, self.ttl)
        with self.store.lock(NS_DRAFT, key.storage_key, lease=10.0, wait=10.0):
            rec = self.store.get(NS_DRAFT, key.storage_key)
            if rec is not None and key.owns(rec) and rec.get("draft_id") == draft_id:
                self.store.delete(NS_DRAFT, key.storage_key)

    def discard(self, key: DraftKey, draft_id: str) -> bool:
        """The author throws the draft away (nothing was written). True when a draft was deleted."""
        with self.store.lock(NS_DRAFT, key.storage_key, lease=10.0, wait=10.0):
            rec = self.load(key)
            if rec is None or rec.get("draft_id") != draft_id:
                return False
            self.store.delete(NS_DRAFT, key.storage_key)
            return True
