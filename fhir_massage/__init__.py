"""fhir-massage: screening, ordering and documenting medical massage from inside an EHR (SMART on FHIR)."""

__version__ = "0.1.0"
