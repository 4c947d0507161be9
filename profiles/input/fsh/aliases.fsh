// Code-system URIs exactly as in fhir_massage/codes.py (reference: fhir-modelling.md "use exactly these").
Alias: $sct = http://snomed.info/sct
Alias: $loinc = http://loinc.org
Alias: $cpt = http://www.ama-assn.org/go/cpt
Alias: $ucum = http://unitsofmeasure.org
Alias: $icd10cm = http://hl7.org/fhir/sid/icd-10-cm
Alias: $actcode = http://terminology.hl7.org/CodeSystem/v3-ActCode
Alias: $taskcode = http://hl7.org/fhir/CodeSystem/task-code
Alias: $uscore-careplan-category = http://hl7.org/fhir/us/core/CodeSystem/careplan-category
Alias: $nucc = http://nucc.org/provider-taxonomy
Alias: $technique = https://fhir-massage.dev/fhir/CodeSystem/massage-technique
Alias: $bodysite-vs = https://fhir-massage.dev/fhir/ValueSet/massage-body-site
