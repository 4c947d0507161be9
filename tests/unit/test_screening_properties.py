"""Properties of the verdict (hypothesis): more chart never means a milder verdict, fewer proposed techniques never
a harsher one, and the order of the resources never matters."""

from __future__ import annotations

from datetime import date

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_massage.chart import from_resources
from fhir_massage.codes import TECHNIQUES
from fhir_massage.screening import VERDICTS, screen
from tests.unit.test_screening_rules import (
    ICD, SCT, allergy, bp, condition, med_request, observation, patient, procedure, site, text_condition,
)

TODAY = date(2024, 6, 1)
RANK = {v: i for i, v in enumerate(VERDICTS)}
SITES = ["30021000:left", "30021000:right", "61685007", "53120007:left", "77568009", "818981001", "45048000", "38266002"]

_codes = st.sampled_from([
    ("I82.402", ICD), ("I82.401", ICD), ("128053003", SCT), ("Z86.718", ICD), ("706870000", SCT), ("64859006", SCT),
    ("72892002", SCT), ("O14.13", ICD), ("S81.812A", ICD), ("T23.201A", ICD), ("C50.911", ICD), ("I89.0", ICD),
    ("88805009", SCT), ("I50.21", ICD), ("I71.4", ICD), ("I83.91", ICD), ("E05.00", ICD), ("44465007", SCT),
    ("278860009", SCT), ("J30.2", ICD), ("L03.116", ICD), ("I63.9", ICD), ("N18.6", ICD),
])
_dates = st.sampled_from(["2019-03-01", "2023-12-01", "2024-03-15", "2024-05-20", "2024-05-31", "2024-07-01", None])
_status = st.sampled_from(["active", "resolved", "inactive", None])
_verification = st.sampled_from([None, "confirmed", "unconfirmed", "refuted", "entered-in-error"])
_sites = st.sampled_from([None, site("30021000", "left"), site("61685007", "right"), site("53120007")])


@st.composite
def resources(draw, n_max=8):
    out = []
    for i in range(draw(st.integers(0, n_max))):
        kind = draw(st.integers(0, 6))
        rid = f"r{i}"
        if kind <= 2:
            code, system = draw(_codes)
            onset = draw(_dates)
            status = draw(_status)
            abatement = None
            if status == "resolved" and onset:
                abatement = draw(st.sampled_from([None, "2024-05-25", "2024-06-20"]))
            out.append(condition(rid, code, system, status=status, verification=draw(_verification), onset=onset,
                                 abatement=abatement, body_site=draw(_sites)))
        elif kind == 3:
            out.append(med_request(rid, draw(st.sampled_from(["855332", "1364445", "32968", "313782"])),
                                   status=draw(st.sampled_from(["active", "stopped", "cancelled"])),
                                   authored=draw(st.sampled_from(["2024-05-20", "2023-01-01", "2024-07-01"]))))
        elif kind == 4:
            out.append(draw(st.sampled_from([
                observation(rid, "777-3", draw(st.sampled_from([15, 35, 250])), "10*3/uL",
                            when=draw(st.sampled_from(["2024-05-31T10:00:00Z", "2024-01-02T10:00:00Z"]))),
                observation(rid, "8310-5", draw(st.sampled_from([36.8, 38.6])), "Cel"),
                bp(rid, draw(st.sampled_from([120, 165, 190])), 80),
                observation(rid, "6301-6", draw(st.sampled_from([1.1, 3.4, 4.6])), "{INR}"),
            ])))
        elif kind == 5:
            out.append(draw(st.sampled_from([procedure(rid, "Total knee arthroplasty", body_site=site("72696002", "left")),
                                             procedure(rid, "Appendectomy", performed="2024-05-30"),
                                             allergy(rid, "Almond oil"), allergy(rid, "Penicillin")])))
        else:
            out.append(text_condition(rid, draw(st.sampled_from(["Blood clot in leg", "Seasonal allergies", "DVT"]))))
    return out


def verdict(res, techniques=None, sites=None):
    return screen(from_resources([patient()] + list(res)), techniques=techniques, sites=sites, today=TODAY)


def _observation_kind(r):
    if r.get("resourceType") != "Observation":
        return None
    return r["code"]["coding"][0]["code"]


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(resources(), resources(n_max=3), st.lists(st.sampled_from(TECHNIQUES), max_size=3, unique=True),
       st.lists(st.sampled_from(SITES), max_size=2, unique=True))
def test_adding_resources_never_lowers_the_verdict(base, extra, techniques, sites):
    # Observations are excluded from the added part: a newer lab legitimately replaces an older one (latest wins).
    extra = [dict(r, id=f"x{i}") for i, r in enumerate(extra) if r.get("resourceType") != "Observation"]
    t = techniques or None
    s = sites or None
    before = verdict(base, t, s)
    after = verdict(base + extra, t, s)
    assert RANK[after.verdict] >= RANK[before.verdict]
    assert {f.rule for f in before.findings} <= {f.rule for f in after.findings}


@_settings
@given(resources(), st.lists(st.sampled_from(TECHNIQUES), min_size=1, max_size=7, unique=True), st.data())
def test_removing_a_proposed_technique_never_raises_the_verdict(res, techniques, data):
    fewer = data.draw(st.lists(st.sampled_from(techniques), min_size=1, max_size=len(techniques), unique=True))
    assert RANK[verdict(res, fewer).verdict] <= RANK[verdict(res, techniques).verdict]


@_settings
@given(resources(), st.randoms(use_true_random=False))
def test_resource_order_never_changes_the_result(res, rnd):
    shuffled = list(res)
    rnd.shuffle(shuffled)
    a = verdict(res).to_json()
    b = verdict(shuffled).to_json()
    assert a == b


@_settings
@given(resources(), st.sampled_from(SITES))
def test_a_site_inside_another_is_never_harsher(res, outer):
    # proposing a smaller area (left lower leg) can only be as bad as the limb or whole body that contains it
    inner_of = {"61685007": "30021000:left", "38266002": "30021000:right", "77568009": "52612000"}
    if outer not in inner_of:
        return
    assert RANK[verdict(res, None, [inner_of[outer]]).verdict] <= RANK[verdict(res, None, [outer]).verdict]


@_settings
@given(resources(), st.lists(st.sampled_from(TECHNIQUES), max_size=3, unique=True),
       st.lists(st.sampled_from(SITES), max_size=2, unique=True))
def test_information_never_changes_the_verdict(res, techniques, sites):
    # Informational rules (a product allergy) are for the therapist, not contraindications: taking every
    # AllergyIntolerance out of the chart leaves the verdict and the findings as they were, and information
    # items never appear among the findings (whose class stays absolute / relative / local).
    t, s = techniques or None, sites or None
    with_all = verdict(res, t, s)
    without = verdict([r for r in res if r.get("resourceType") != "AllergyIntolerance"], t, s)
    assert with_all.verdict == without.verdict
    assert [f.rule for f in with_all.findings] == [f.rule for f in without.findings]
    assert all(f.informational for f in with_all.information)
    assert not any(f.informational for f in with_all.findings)
    assert {f["class"] for f in with_all.to_json()["findings"]} <= {"absolute", "relative", "local"}
