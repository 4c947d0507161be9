// The technique keys are fixed by the product (fhir_massage/codes.py TECHNIQUES); tests/unit/test_validation.py
// fails if this CodeSystem and the Python tuple drift apart.
CodeSystem: MassageTechnique
Id: massage-technique
Title: "Massage technique"
Description: "The massage techniques fhir-massage screens, orders and documents. Used next to the billing code (CPT) in ServiceRequest.code and Procedure.code. No SNOMED CT concept ids are given: the reference research could not verify them (fhir-modelling.md, 'SNOMED CT for massage and techniques'), so none are guessed."
* ^status = #draft
* ^experimental = false
* ^caseSensitive = true
* ^content = #complete
* ^valueSet = "https://fhir-massage.dev/fhir/ValueSet/massage-technique"
* #swedish "Swedish massage" "Classic relaxation / therapeutic massage with effleurage (gliding), petrissage (kneading), friction, tapotement (percussion) and vibration, at light to moderate pressure."
* #deep-tissue "Deep tissue massage" "Slow, firm, sustained pressure and cross-fibre strokes aimed at deeper layers of muscle and fascia."
* #myofascial-release "Myofascial release" "Sustained low-load stretch and pressure applied to fascial restrictions to restore tissue mobility."
* #trigger-point "Trigger point therapy" "Ischaemic compression and local stretching of hyperirritable spots (trigger points) in taut bands of skeletal muscle. Manual technique; not dry needling."
* #lymphatic-drainage "Manual lymphatic drainage" "Very light, rhythmic skin-stretching strokes in the direction of lymph flow, clearing proximal nodes first, to reduce lymphoedema; part of complete decongestive therapy."
* #neuromuscular "Neuromuscular therapy" "Systematic soft-tissue work on muscles, trigger points and nerve compression sites as practised by massage therapists (NMT). Distinct from neuromuscular re-education (CPT 97112)."
* #stretching "Assisted stretching" "Therapist-assisted passive or active-assisted stretching of muscles and joints to improve range of motion and flexibility."

ValueSet: MassageTechniqueVS
Id: massage-technique
Title: "Massage techniques"
Description: "All techniques of the fhir-massage technique code system."
* ^status = #draft
* ^experimental = false
* include codes from system MassageTechnique

ValueSet: MassageCptVS
Id: massage-cpt
Title: "CPT codes for medical massage"
Description: "The CPT codes fhir-massage puts in ServiceRequest.code and Procedure.code (timed codes, 15-minute units). Codes only: CPT descriptors are copyrighted by the AMA."
* ^status = #draft
* ^experimental = false
* ^copyright = "CPT is a registered trademark of the American Medical Association. Codes only; no descriptors reproduced."
* $cpt#97124 "Massage therapy"
* $cpt#97140 "Manual therapy techniques"
* $cpt#97112 "Neuromuscular reeducation"
* $cpt#97110 "Therapeutic exercise"
* $cpt#97530 "Therapeutic activities"

ValueSet: MassageDetectedIssueCategoryVS
Id: massage-detected-issue-category
Title: "Massage contraindication categories"
Description: "The v3 ActCode detected-issue codes that fit a massage contraindication (fhir-modelling.md, DetectedIssue): condition, pregnancy, lactation, lab, drug, age alerts, the generic observation alert and duplicate therapy."
* ^status = #draft
* ^experimental = false
* $actcode#COND "Condition Alert"
* $actcode#PREG "Pregnancy Alert"
* $actcode#LACT "Lactation Alert"
* $actcode#LAB "Lab Alert"
* $actcode#DACT "Drug Action Detected Issue"
* $actcode#AGE "Age Alert"
* $actcode#GEALRT "Geriatric Alert"
* $actcode#PEALRT "Pediatric Alert"
* $actcode#OBSA "Observation Alert"
* $actcode#DUPTHPY "Duplicate Therapy Alert"

ValueSet: MassageTaskCodeVS
Id: massage-task-code
Title: "Massage task codes"
Description: "What a fhir-massage Task asks for: fulfil the massage order, or have the physician approve something (clearance, plan recertification)."
* ^status = #draft
* ^experimental = false
* $taskcode#fulfill "Fulfill the focal request"
* $taskcode#approve "Activate/approve the focal resource"

ValueSet: MassageProcedureStatusVS
Id: massage-procedure-status
Title: "Massage session status"
Description: "The Procedure statuses a massage session takes: planned/under way, done, not done (cancelled, with a reason), or recorded in error."
* ^status = #draft
* ^experimental = false
* http://hl7.org/fhir/event-status#preparation "Preparation"
* http://hl7.org/fhir/event-status#in-progress "In Progress"
* http://hl7.org/fhir/event-status#completed "Completed"
* http://hl7.org/fhir/event-status#not-done "Not Done"
* http://hl7.org/fhir/event-status#entered-in-error "Entered in Error"

// Technique -> CPT. Sources: fhir-modelling.md "CPT" table. [V2] unless noted in the comment of a mapping.
Instance: massage-technique-to-cpt
InstanceOf: ConceptMap
Usage: #definition
Title: "Massage technique to CPT"
Description: "Which CPT code bills each fhir-massage technique. The first target of each technique is the default the app uses; a second target is an alternative that depends on what was really done."
* url = "https://fhir-massage.dev/fhir/ConceptMap/massage-technique-to-cpt"
* name = "MassageTechniqueToCpt"
* title = "Massage technique to CPT"
* status = #draft
* experimental = false
* sourceCanonical = "https://fhir-massage.dev/fhir/ValueSet/massage-technique"
* targetCanonical = "https://fhir-massage.dev/fhir/ValueSet/massage-cpt"
* group[0].source = "https://fhir-massage.dev/fhir/CodeSystem/massage-technique"
* group[0].target = "http://www.ama-assn.org/go/cpt"
* group[0].element[0].code = #swedish
* group[0].element[0].display = "Swedish massage"
* group[0].element[0].target[0].code = #97124
* group[0].element[0].target[0].equivalence = #wider
* group[0].element[0].target[0].comment = "97124 massage: effleurage, petrissage and/or tapotement [V2]."
* group[0].element[1].code = #deep-tissue
* group[0].element[1].display = "Deep tissue massage"
* group[0].element[1].target[0].code = #97124
* group[0].element[1].target[0].equivalence = #wider
* group[0].element[1].target[0].comment = "General therapeutic massage is billed as 97124 [V2]; deep tissue is a kind of it [B]."
* group[0].element[2].code = #myofascial-release
* group[0].element[2].display = "Myofascial release"
* group[0].element[2].target[0].code = #97140
* group[0].element[2].target[0].equivalence = #wider
* group[0].element[2].target[0].comment = "Coding references place myofascial release under 97140, not 97124 [V2]."
* group[0].element[3].code = #trigger-point
* group[0].element[3].display = "Trigger point therapy"
* group[0].element[3].target[0].code = #97140
* group[0].element[3].target[0].equivalence = #wider
* group[0].element[3].target[0].comment = "Manual trigger-point work is soft-tissue mobilization, usually 97140 [B]. Dry needling (20560/20561) is not this technique."
* group[0].element[3].target[1].code = #97124
* group[0].element[3].target[1].equivalence = #relatedto
* group[0].element[3].target[1].comment = "Some payers accept 97124 for trigger-point work done within a massage [B]."
* group[0].element[4].code = #lymphatic-drainage
* group[0].element[4].display = "Manual lymphatic drainage"
* group[0].element[4].target[0].code = #97140
* group[0].element[4].target[0].equivalence = #wider
* group[0].element[4].target[0].comment = "The 97140 descriptor names manual lymphatic drainage [V2]."
* group[0].element[5].code = #neuromuscular
* group[0].element[5].display = "Neuromuscular therapy"
* group[0].element[5].target[0].code = #97140
* group[0].element[5].target[0].equivalence = #wider
* group[0].element[5].target[0].comment = "Neuromuscular therapy as practised by massage therapists is usually billed as 97140 or 97124, not 97112 [B]."
* group[0].element[5].target[1].code = #97112
* group[0].element[5].target[1].equivalence = #relatedto
* group[0].element[5].target[1].comment = "Only when the session is true neuromuscular re-education of movement, balance or proprioception (e.g. PNF) [V2]."
* group[0].element[6].code = #stretching
* group[0].element[6].display = "Assisted stretching"
* group[0].element[6].target[0].code = #97110
* group[0].element[6].target[0].equivalence = #wider
* group[0].element[6].target[0].comment = "Stretching programmes as therapeutic exercise (flexibility, ROM) [B for wording]."
