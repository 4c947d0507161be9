"""WSGI entry point for production servers: ``gunicorn 'smart_app.wsgi:app'`` (docs/deployment.md).

Everything comes from the environment, so that every worker of every instance builds the same app:

  FHIR_MASSAGE_REGISTRATIONS   path of the EHR registrations file (TOML [[ehr]] tables, docs/registrations-file.md);
                               required
  FHIR_MASSAGE_PUBLIC_URL      the app's external https URL (the redirect URI is this + /callback); required
  FHIR_MASSAGE_STORE_URL       postgresql://... shared by all instances (sqlite only for a single process)
  FHIR_MASSAGE_SECRET_KEY      the same value on every instance and worker (CSRF tokens must verify anywhere)
  FHIR_MASSAGE_TRUST_PROXY_TLS 1 when a TLS proxy terminates https in front (it must set X-Forwarded-Proto/Host)

All of these (and the lifetimes, e.g. FHIR_MASSAGE_DRAFT_TTL) are read by ``smart_app.config.from_env``; this
module adds the production rules: the registrations, public URL and a strong shared secret are required.
FHIR_MASSAGE_LOG_FORMAT=json writes one JSON object per log line (smart_app/logs.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from fhir_massage.errors import InvalidInput

from . import create_app
from .config import from_env

__all__ = ["app", "build_config"]


def build_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The create_app config for a production process; raises InvalidInput with one plain sentence."""
    env = os.environ if environ is None else environ
    config = from_env(env)
    if not config.get("REGISTRATIONS"):
        raise InvalidInput("Set FHIR_MASSAGE_REGISTRATIONS to the EHR registrations file (docs/registrations-file.md).")
    if not config.get("PUBLIC_URL"):
        raise InvalidInput("Set FHIR_MASSAGE_PUBLIC_URL to the app's external URL (the EHRs redirect there).")
    if not config.get("SECRET_KEY"):
        # One random key per worker would make a form rendered by one worker fail on another.
        raise InvalidInput("Set FHIR_MASSAGE_SECRET_KEY: every worker and instance must share it.")
    if len(str(config["SECRET_KEY"])) < 32:
        # It signs the CSRF tokens: a short key can be guessed offline from one token.
        raise InvalidInput("FHIR_MASSAGE_SECRET_KEY is too short: use at least 32 random characters "
                           "(python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return config


_app = None


def __getattr__(name: str) -> Any:
    # Built on first access (gunicorn's getattr of "app"), so importing build_config has no side effects.
    global _app
    if name == "app":
        if _app is None:
            from . import logs

            logs.configure(os.environ.get("FHIR_MASSAGE_LOG_FORMAT", "plain"))
            _app = create_app(build_config())
        return _app
    raise AttributeError(name)
