"""The embedded sandbox EHR: a strict FHIR R4 server, a SMART authorization server, an EHR simulator, demo patients.

One Flask app (``server.create_sandbox_app``) serves, on one loopback port:
  /fhir/...            the FHIR R4 4.0.1 REST API (fhir_api.py, storage in store.py, search in search.py)
  /auth/..., /.well-known/...   the SMART authorization server (auth.py)
  /ehr/...             the EHR simulator that embeds the app in an iframe (ehr.py)
It imports the domain library's helpers at most, never smart_app.
"""
