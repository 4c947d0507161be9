"""The sandbox's EHR simulator: pick a user, a patient and an app, and the app opens in an iframe, launched the way
an EHR embeds a SMART app (SMART App Launch 2.2 "EHR launch": the EHR opens the app's launch URL with ``iss`` and
an opaque ``launch``).

- ``GET /ehr[?user=..]``: the picker. Each patient says who may open the chart (the users on the patient's active
  CareTeam, or the generalPractitioner: ``SandboxAuth.accessible_patients``); with ``user`` only that user's
  patients are offered.
- ``GET /ehr/launch?client_id=..&user=..&patient=..[&intent=..][&encounter=..][&embed=0|1]``: creates a launch;
  ``embed=1`` (default) shows the EHR frame with the app inside, ``embed=0`` redirects straight to the app's launch
  URL (tests and demos that need no clicks). A patient the user may not access is refused (403 page), as an EHR
  does not open a chart outside the user's care relationships.
- ``GET /ehr/smart-style.json``: the SMART styling document (SMART 2.2 "Styling", ``smart_style_url``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, jsonify, redirect, render_template, request

from fhir_massage.errors import InvalidInput

bp = Blueprint("sandbox_ehr", __name__, template_folder="templates", url_prefix="/ehr")

# Keys from SMART 2.2 "Styling"; the values are the simulator's own look (static/sandbox.css uses the same).
SMART_STYLE = {
    "color_background": "#f5f7f9",
    "color_error": "#b00020",
    "color_highlight": "#005f73",
    "color_modal_backdrop": "rgba(0, 0, 0, 0.45)",
    "color_success": "#1b7f3b",
    "color_text": "#1d2329",
    "dim_border_radius": "4px",
    "dim_font_size": "16px",
    "dim_spacing_size": "16px",
    "font_family_body": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
    "font_family_heading": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
}


def _auth():
    from fhir_massage.sandbox.auth import current

    return current()


def _secure(resp, frame_src: str = "'none'"):
    # The simulator's own pages: no scripts at all; it may frame only the app it launched.
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        f"frame-src {frame_src}; frame-ancestors 'none'; base-uri 'none'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("")
@bp.get("/")
def index():
    auth = _auth()
    clients = [c for c in auth.all_clients() if c.launch_url]
    users = auth.users()
    access = {u["id"]: auth.accessible_patients(u) for u in users}
    # Who may open each chart, shown next to the patient: the simulator has no scripts to filter on a click.
    care = {p["id"]: [u["name"] for u in users if p["id"] in access[u["id"]]] for p in auth.patients()}
    chosen = auth.find_user(request.args.get("user"))
    patients = auth.patients()
    if chosen is not None:
        patients = [p for p in patients if p["id"] in access[chosen["id"]]]
    resp = current_app.make_response(render_template(
        "ehr/index.html", users=users, patients=patients, clients=clients, error=None, care=care,
        chosen=chosen, counts={k: len(v) for k, v in access.items()}))
    return _secure(resp)


@bp.get("/launch")
def launch():
    auth = _auth()
    args = request.args
    client = auth.query_client(args.get("client_id", ""))
    if client is None or not client.launch_url:
        return _error("No registered app with a launch URL has that client_id.")
    patient = args.get("patient") or None
    known = {p["id"]: p for p in auth.patients()}
    user = auth.find_user(args.get("user"))
    if user is not None and patient is not None and patient not in auth.accessible_patients(user):
        return _error(f"{user['name']} may not open this patient's chart: they are not on the patient's care team"
                      " (nor the patient's primary care provider).", status=403)
    try:
        out = auth.create_launch(client.client_id, args.get("user", ""), patient, encounter=args.get("encounter") or None,
                                 intent=args.get("intent") or None)
    except InvalidInput as exc:
        return _error(exc.message)
    if args.get("embed", "1") == "0":
        return redirect(out["launch_url"], code=302)
    origin = urlsplit(out["launch_url"])
    resp = current_app.make_response(render_template(
        "ehr/frame.html", app_url=out["launch_url"], client=client, user=user,
        patient=known.get(patient) if patient else None, patient_id=patient))
    # 'self' too: inside the iframe the app redirects to this EHR's own /auth/authorize (SMART EHR launch)
    return _secure(resp, frame_src=f"{origin.scheme}://{origin.netloc} 'self'")


@bp.get("/smart-style.json")
def smart_style():
    resp = jsonify(SMART_STYLE)
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


def _error(message: str, status: int = 400):
    resp = current_app.make_response((render_template("auth/error.html", title="Cannot launch the app",
                                                      message=message), status))
    return _secure(resp)
