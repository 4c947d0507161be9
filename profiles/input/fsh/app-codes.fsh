// Small app code systems the builders (fhir_massage/builders/) put next to free text. The codes are the builders';
// tests/unit/test_validation_builders.py fails when a builder writes a code that is not defined here.

CodeSystem: MassageOrderDetail
Id: massage-order-detail
Title: "Massage order detail"
Description: "Kinds of technique parameters in ServiceRequest.orderDetail; the detail itself is in CodeableConcept.text (fhir-modelling.md: orderDetail for pressure, positioning, schedule)."
* ^status = #draft
* ^experimental = false
* ^caseSensitive = true
* ^content = #complete
* #schedule "Schedule" "Frequency and duration in words (e.g. '2 sessions a week for 6 weeks, 45 minutes'), repeated from occurrenceTiming because not every EHR stores Timing (US Core flags only Period as must-support)."
* #pressure-light "Light pressure" "Light pressure only."
* #pressure-moderate "Moderate pressure" "Up to moderate pressure."
* #pressure-firm "Firm pressure" "Firm pressure allowed."
* #positioning "Positioning" "A positioning instruction, e.g. side-lying after 20 weeks' gestation."

CodeSystem: MassageTaskIO
Id: massage-task-io
Title: "Massage task inputs and outputs"
Description: "Types of Task.output and Task.businessStatus of a massage fulfilment Task."
* ^status = #draft
* ^experimental = false
* ^caseSensitive = true
* ^content = #complete
* #session "Session" "A completed session (Task.output.valueReference -> Procedure, status completed)."
* #session-not-done "Session not done" "A session that did not take place (Task.output.valueReference -> Procedure, status not-done)."
* #sessions-done "Sessions done" "Task.businessStatus: how many of the authorised sessions are done (text, e.g. 'in progress 4/12')."

CodeSystem: MassageMessageCategory
Id: massage-message-category
Title: "Massage message category"
Description: "What a therapist-physician message is about; sent next to the HL7 communication-category code."
* ^status = #draft
* ^experimental = false
* ^caseSensitive = true
* ^content = #complete
* #progress "Progress report" "The therapist reports progress (sessions done, outcomes)."
* #condition-change "Change in condition" "Something changed that the physician should know (new symptom, adverse event)."
* #request "Request" "A question or request to the other party (clearance, plan change)."

CodeSystem: CdsOverrideReason
Id: cds-override-reason
Title: "CDS override reason"
Description: "Why a clinician went ahead despite a fhir-massage CDS card: the card's overrideReasons (CDS Hooks 2.0 'Card': overrideReasons are Codings) and the code of the DetectedIssue.mitigation.action written from an 'overridden' feedback. Codes and displays are fhir_massage/cds_cards.py OVERRIDE_REASONS."
* ^status = #draft
* ^experimental = false
* ^caseSensitive = true
* ^content = #complete
* #clearance-obtained "Physician clearance obtained and documented" "A physician cleared the patient for this massage; the clearance is documented."
* #benefit-outweighs-risk "Benefit outweighs risk (e.g. palliative care)" "The expected benefit outweighs the flagged risk, e.g. in palliative care."
* #patient-declined-alternative "Patient declined the suggested alternative" "The patient declined the technique or site the card suggested instead."
* #not-applicable "Not applicable: chart data outdated or incorrect" "The chart data behind the card is outdated or incorrect."
