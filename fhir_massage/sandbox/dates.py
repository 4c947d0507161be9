"""FHIR dates as ranges (R4 §3.1.1.4.2 "date"): every date, dateTime, instant and Period is an interval.

A partial date is the whole interval it names ("2020" = all of 2020). Times without a zone are read as UTC
(R4 leaves it to the server; the sandbox is one machine, so UTC is the one stable choice). Intervals are half-open
``[lo, hi)`` in epoch seconds, so "2020-03" ends where "2020-04" starts.
"""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta, timezone

# R4 §2.24.0.1 dateTime regex, relaxed to also accept hh:mm (allowed in search values, R4 §3.1.1.4.2).
_DATE_RE = re.compile(
    r"^(?P<y>[0-9]{4})(-(?P<m>0[1-9]|1[0-2])(-(?P<d>0[1-9]|[12][0-9]|3[01])"
    r"(T(?P<H>[01][0-9]|2[0-3]):(?P<M>[0-5][0-9])(:(?P<S>[0-5][0-9]|60)(?P<f>\.[0-9]+)?)?"
    r"(?P<tz>Z|[+-](?:0[0-9]|1[0-3]):[0-5][0-9]|\+14:00)?)?)?)?$"
)

OPEN_LOW = -1e18
OPEN_HIGH = 1e18


class BadDate(ValueError):
    pass


def date_range(text: str) -> tuple[float, float]:
    """``"2020-02"`` -> (start of Feb 2020, start of Mar 2020) in epoch seconds; BadDate when it is no FHIR date."""
    m = _DATE_RE.match(text or "")
    if not m:
        raise BadDate(f"'{text}' is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[Z|+hh:mm])")
    y = int(m["y"])
    if m["m"] is None:
        return _ts(datetime(y, 1, 1)), _ts(datetime(y + 1, 1, 1))
    mo = int(m["m"])
    if m["d"] is None:
        nxt = datetime(y + 1, 1, 1) if mo == 12 else datetime(y, mo + 1, 1)
        return _ts(datetime(y, mo, 1)), _ts(nxt)
    d = int(m["d"])
    if d > calendar.monthrange(y, mo)[1]:
        raise BadDate(f"'{text}' is not a real calendar day")
    if m["H"] is None:
        start = datetime(y, mo, d)
        return _ts(start), _ts(start + timedelta(days=1))
    sec = min(int(m["S"] or 0), 59)  # leap second 60 folds onto 59
    frac = m["f"] or ""
    start = datetime(y, mo, d, int(m["H"]), int(m["M"]), sec)
    tz = m["tz"]
    offset = 0.0
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    lo = _ts(start) - offset + (float(frac) if frac else 0.0)
    if m["S"] is None:
        width = 60.0
    elif frac:
        width = 10.0 ** -(len(frac) - 1)
    else:
        width = 1.0
    return lo, lo + width


def _ts(dt: datetime) -> float:
    return dt.replace(tzinfo=timezone.utc).timestamp()


def period_range(period: dict) -> tuple[float, float]:
    """A Period: a missing start or end is open (R4 §2.24.0.9: an open end means "ongoing")."""
    lo, hi = OPEN_LOW, OPEN_HIGH
    if period.get("start"):
        lo = date_range(period["start"])[0]
    if period.get("end"):
        hi = date_range(period["end"])[1]
    return lo, hi


def is_valid(text: str) -> bool:
    try:
        date_range(text)
        return True
    except BadDate:
        return False
