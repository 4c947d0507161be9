"""An independent SMART client, PyPI ``fhirclient`` 4.4 (smart-on-fhir/client-py), completes an EHR launch against
the sandbox: it discovers only through the CapabilityStatement's oauth-uris extension and asks v1 scopes, so this
checks the sandbox still speaks the SMART v1 dialect that such clients (and older EHR integrations) use."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from fhirclient import client
from fhirclient.models.condition import Condition

from fhir_massage.sandbox.demo import DEMO_PATIENTS
from tests.fixtures.smart_sandbox import REDIRECT_URI, create_launch

pytestmark = pytest.mark.integration


def _patient_with_conditions(sb) -> str:
    # The hand-made demo patients' stories are built around their Conditions (DVT, pregnancy, ...).
    return DEMO_PATIENTS[1]["id"]


@pytest.mark.parametrize("discovery", ["both", "capability-only"])
def test_fhirclient_ehr_launch_reads_conditions(make_smart_sandbox, discovery):
    sb = make_smart_sandbox(auth={"discovery": discovery})
    patient = _patient_with_conditions(sb)
    launch = create_launch(sb, "test-public", "dr-ada-grey", patient)

    smart = client.FHIRClient(settings={
        "app_id": "test-public",
        "api_base": launch["iss"],
        "redirect_uri": REDIRECT_URI,
        "launch_token": launch["launch"],
        "scope": "openid fhirUser patient/*.read user/Practitioner.read",
    })
    authorize_url = smart.authorize_url  # fetches /metadata and reads the oauth-uris extension
    assert authorize_url.startswith(f"{sb.url}/auth/authorize?")
    query = parse_qs(urlsplit(authorize_url).query)
    assert query["aud"] == [sb.fhir_base] and query["code_challenge_method"] == ["S256"]

    # The browser's part: follow the authorize request to the app's redirect URI (nothing listens there).
    resp = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert resp.status_code == 302, resp.text[:300]
    callback = resp.headers["Location"]
    assert callback.startswith(REDIRECT_URI + "?") and "code=" in callback

    smart.handle_callback(callback)
    assert smart.ready
    assert smart.patient_id == patient
    granted = set(smart.launch_context["scope"].split())
    assert {"launch", "openid", "fhirUser", "patient/*.read", "user/Practitioner.read"} <= granted

    conditions = list(Condition.where(struct={"patient": patient}).perform_resources_iter(smart.server))
    assert conditions, "the demo patient's Conditions should be readable"
    assert all(c.subject.reference == f"Patient/{patient}" for c in conditions)

    # The v1 read grant does not reach another patient's chart.
    other = DEMO_PATIENTS[2]["id"]
    with pytest.raises(Exception) as exc:
        smart.server.request_json(f"Patient/{other}")
    assert "403" in str(exc.value) or "Forbidden" in str(exc.value)
