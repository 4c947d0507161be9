"""Pure builders: domain values -> FHIR R4 resources as plain dicts (no I/O, no clock reads: pass `now`).

One module per kind of write: detected_issue (findings), order (ServiceRequest, Task, Provenance), session
(Procedure, pain Observations), messages (Communication), plan (CarePlan). Import from the submodule.
"""
