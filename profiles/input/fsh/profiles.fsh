// Profiles on base R4 4.0.1. The US Core package cannot be loaded offline, so the US Core constraints that matter
// for what we write are mirrored here (see profiles/README.md "US Core constraints mirrored").

RuleSet: MassageCode
// The technique coding sits next to the billing code: CPT first (what EHRs and billing understand), our technique
// code so the app can read its own orders back without a CPT->technique guess. Sliced by coding.system.
* code 1..1 MS
* code.text 1..1 MS
* code.text ^short = "Human name of the order/session, e.g. 'Manual lymphatic drainage, left upper limb'"
* code.coding 2..* MS
* code.coding ^slicing.discriminator.type = #value
* code.coding ^slicing.discriminator.path = "system"
* code.coding ^slicing.rules = #open
* code.coding ^slicing.ordered = false
* code.coding ^slicing.description = "Slice by code system: CPT (billing) and the fhir-massage technique"
* code.coding contains cpt 1..1 MS and technique 1..1 MS
* code.coding[cpt].system 1..1
* code.coding[cpt].system = $cpt (exactly)
* code.coding[cpt].code 1..1
* code.coding[cpt] from MassageCptVS (required)
* code.coding[technique].system 1..1
* code.coding[technique].system = $technique (exactly)
* code.coding[technique].code 1..1
* code.coding[technique] from MassageTechniqueVS (required)

Invariant: mpr-1
Description: "A session that was not done says why (statusReason)."
Expression: "status = 'not-done' implies statusReason.exists()"
Severity: #error

Invariant: mpr-2
Description: "A completed session has a start and an end (minutes drive CPT timed units, the CMS 8-minute rule)."
Expression: "status = 'completed' implies (performed.start.exists() and performed.end.exists())"
Severity: #error

Invariant: mps-1
Description: "A 0-10 numeric rating scale score is between 0 and 10."
Expression: "value.exists() implies ((value as integer) between 0 and 10 or (value as Quantity).value between 0 and 10)"
Severity: #error

Invariant: mps-2
Description: "A score given as a Quantity uses the UCUM unit {score}."
Expression: "(value as Quantity).exists() implies ((value as Quantity).system = 'http://unitsofmeasure.org' and (value as Quantity).code = '{score}')"
Severity: #error

Invariant: msr-1
Description: "A quantity of sessions uses the UCUM annotation {session}."
Expression: "(quantity as Quantity).exists() implies ((quantity as Quantity).system = 'http://unitsofmeasure.org' and (quantity as Quantity).code = '{session}')"
Severity: #error

Profile: MassageServiceRequest
Parent: ServiceRequest
Id: massage-service-request
Title: "Massage order"
Description: "A physician's order (or a draft, or a therapist's proposal) for one technique family of medical massage: CPT + technique code, treatment sites, number and frequency of sessions, the contraindication findings in supportingInfo. One ServiceRequest per technique (CPT units and contraindications differ per technique)."
* ^status = #draft
* ^experimental = false
* obeys msr-1
* status MS
* intent MS
* intent ^short = "order (signed) | proposal (therapist suggests a change) | plan (inside a CarePlan)"
* category 1..* MS
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category contains physicalTherapy 1..1 MS
* category[physicalTherapy] = $sct#91251008
* category[physicalTherapy] ^short = "SNOMED 91251008 Physical therapy procedure (regime/therapy)"
* insert MassageCode
* orderDetail MS
* quantity[x] only Quantity
* quantity[x] MS
* occurrence[x] only Timing or Period
* occurrence[x] MS
* subject only Reference(Patient)
* subject MS
* encounter MS
* authoredOn MS
* requester MS
* performerType MS
* reasonCode MS
* reasonReference MS
* supportingInfo MS
* supportingInfo ^short = "The screening: DetectedIssue findings, pregnancy status, platelet count, consent"
* bodySite MS
* bodySite from $bodysite-vs (extensible)
* bodySite ^short = "Where to treat (never where to avoid: that goes in orderDetail or note)"
* note MS
* patientInstruction MS

Profile: MassageProcedure
Parent: Procedure
Id: massage-procedure
Title: "Massage session"
Description: "One massage session as performed (or not done, with the reason): what was done (CPT + technique), when (a Period: its minutes drive CPT timed units), where on the body, by whom, and the order it fulfils."
* ^status = #draft
* ^experimental = false
* obeys mpr-1 and mpr-2
* basedOn 1..* MS
* basedOn only Reference(ServiceRequest)
* status MS
* status from MassageProcedureStatusVS (required)
* statusReason MS
* insert MassageCode
* subject only Reference(Patient)
* subject MS
* encounter MS
* performed[x] 1..1 MS
* performed[x] only Period
* performer MS
* performer.actor MS
* bodySite MS
* bodySite from $bodysite-vs (extensible)
* outcome MS
* complication MS
* complicationDetail MS
* note MS

Profile: MassageContraindication
Parent: DetectedIssue
Id: massage-contraindication
Title: "Massage contraindication finding"
Description: "A finding of the contraindication screening: which rule fired, how severe it is (absolute = high, relative = moderate, local = low), what the proposed massage order conflicts with, and how it was mitigated."
* ^status = #draft
* ^experimental = false
* status MS
* status ^short = "preliminary while the order is drafted, final once the physician acts"
* code 1..1 MS
* code from MassageDetectedIssueCategoryVS (required)
* severity 1..1 MS
* severity ^short = "high (absolute) | moderate (relative) | low (local)"
* patient 1..1 MS
* identified[x] 1..1 MS
* identified[x] only dateTime
* author MS
* implicated 1..* MS
* implicated ^short = "The massage order and the resource that triggered the rule (Condition, MedicationRequest, Observation)"
* evidence MS
* detail 1..1 MS
* reference MS
* reference ^short = "URL of the rule in the fhir-massage knowledge base"
* mitigation MS

Profile: MassagePainScore
Parent: Observation
Id: massage-pain-score
Title: "Pain score (0-10 NRS)"
Description: "A patient-reported 0-10 numeric pain rating, before or after a massage session (LOINC 72514-3), linked to the session (partOf) and the order (basedOn)."
* ^status = #draft
* ^experimental = false
* obeys mps-1 and mps-2
* status MS
* basedOn MS
* basedOn only Reference(ServiceRequest or CarePlan)
* partOf MS
* partOf only Reference(Procedure)
* code MS
* code = $loinc#72514-3
* code ^short = "LOINC 72514-3 Pain severity - 0-10 verbal numeric rating [Score] - Reported"
* subject 1..1 MS
* subject only Reference(Patient)
* effective[x] 1..1 MS
* effective[x] only dateTime or Period
* value[x] MS
* value[x] only integer or Quantity

Profile: MassagePlan
Parent: CarePlan
Id: massage-plan
Title: "Medical massage plan"
Description: "The plan of care for medical massage: the conditions it addresses, its goals, one activity per massage order, with the sessions and outcome observations as activity outcomes. Mirrors US Core CarePlan: narrative, status, intent, category assess-plan, subject."
* ^status = #draft
* ^experimental = false
* text 1..1 MS
* text.status MS
* text.div MS
* status MS
* intent MS
* category 1..* MS
* category ^slicing.discriminator.type = #pattern
* category ^slicing.discriminator.path = "$this"
* category ^slicing.rules = #open
* category contains AssessPlan 1..1 MS
* category[AssessPlan] = $uscore-careplan-category#assess-plan
* title MS
* subject only Reference(Patient)
* subject MS
* period MS
* author MS
* addresses MS
* addresses only Reference(Condition)
* goal MS
* activity MS
* activity.reference MS
* activity.reference only Reference(ServiceRequest)
* activity.outcomeReference MS
* activity.progress MS

Profile: MassageFulfillment
Parent: Task
Id: massage-fulfillment
Title: "Massage order fulfilment task"
Description: "The FHIR workflow 'request fulfilment' Task for a massage order (code fulfill: owner is the therapist, restriction carries the sessions and window authorised, output the Procedures done), or a request to the physician to approve something (code approve: clearance, plan recertification)."
* ^status = #draft
* ^experimental = false
* basedOn MS
* status MS
* businessStatus MS
* intent = #order
* code 1..1 MS
* code from MassageTaskCodeVS (required)
* focus 1..1 MS
* focus only Reference(ServiceRequest or CarePlan or DetectedIssue)
* for 1..1 MS
* for only Reference(Patient)
* authoredOn MS
* requester MS
* owner MS
* restriction MS
* restriction.repetitions MS
* restriction.period MS
* output MS

Profile: MassageFeedback
Parent: Communication
Id: massage-feedback
Title: "Therapist-physician message"
Description: "A message between the massage therapist and the ordering physician about a patient's massage care: progress reports, questions, replies (inResponseTo)."
* ^status = #draft
* ^experimental = false
* basedOn MS
* basedOn only Reference(ServiceRequest or CarePlan or Task)
* inResponseTo MS
* status MS
* category MS
* subject 1..1 MS
* subject only Reference(Patient)
* about MS
* sent MS
* recipient 1..* MS
* sender 1..1 MS
* payload 1..* MS
