"""Azure AD, just enough for msal's client-credentials grant (protocol.md §3).

Rules:
- ``{authority}/v2.0/.well-known/openid-configuration`` names the token endpoint and keys; the authority's
  tenant may be the domain or the tenant id. Unknown tenant: 400 ``invalid_tenant``.
- ``{authority}/oauth2/v2.0/token`` takes ``grant_type=client_credentials`` with either ``client_secret``
  (form or HTTP Basic) or a ``client_assertion`` (RS256 JWT signed by the application's certificate: ``x5t``
  matches, ``aud`` is the token endpoint, ``iss``/``sub`` are the client id, not expired).
- ``scope`` must be ``<audience>/.default`` for a configured audience.
- Errors have AAD's shape: ``error``, ``error_description`` (with an AADSTS code), ``error_codes``,
  ``timestamp``, ``trace_id``, ``correlation_id``; 401 for client authentication, else 400.
- Access tokens: RS256 JWTs with ``aud``, ``iss``, ``tid``, ``appid``, ``iat``, ``nbf``, ``exp``;
  lifetime ``aad_ttl_s``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import uuid
from typing import Any
from urllib.parse import quote

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from anonjoin.simulator._core import Call, Core
from anonjoin.simulator._tls import client_identity
from anonjoin.simulator._tokens import aad_key

__all__ = ["keys", "openid", "token"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _tenant_ok(core: Core, tenant: str) -> bool:
    t = tenant.lower()
    return t in (core.config.tenant.lower(), core.config.tenant_id.lower())


def _aad_error(status: int, error: str, code: int, description: str) -> web.Response:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
        f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return web.json_response(body, status=status)


async def openid(core: Core, call: Call) -> web.StreamResponse:
    tenant = call.params["tenant"]
    if not _tenant_ok(core, tenant):
        return _aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
    base = f"{call.wire.here}/{tenant}"
    tid_base = f"{call.wire.here}/{core.config.tenant_id}"
    return web.json_response(
        {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{tid_base}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid"],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "sim.anonjoin.invalid",
        }
    )


async def keys(core: Core, call: Call) -> web.StreamResponse:
    if not _tenant_ok(core, call.params["tenant"]):
        return _aad_error(400, "invalid_tenant", 90002, "Tenant not found.")
    return web.json_response({"keys": [aad_key().jwk()]})


async def token(core: Core, call: Call) -> web.StreamResponse:
    tenant = call.params["tenant"]
    if not _tenant_ok(core, tenant):
        return _aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
    request = call.request
    if request.content_type != "application/x-www-form-urlencoded":
        return _aad_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        )
    try:
        form = await request.post()
    except (UnicodeDecodeError, LookupError, ValueError):
        return _aad_error(400, "invalid_request", 900144, "The request body is not a valid form.")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    client_id, secret = fields.get("client_id"), fields.get("client_secret")
    basic = request.headers.get("Authorization", "")
    if basic.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(basic[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return _aad_error(401, "invalid_client", 7000216, "Malformed client authentication header.")
        client_id, secret = client_id or user, password
    if fields.get("grant_type") != "client_credentials":
        return _aad_error(
            400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
        )
    if not client_id:
        return _aad_error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.",
        )
    if client_id != core.config.client_id:
        return _aad_error(
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory.",
        )
    assertion = fields.get("client_assertion")
    token_endpoint = f"{call.wire.here}/{tenant}/oauth2/v2.0/token"
    if assertion is not None:
        if fields.get("client_assertion_type") != ASSERTION_TYPE:
            return _aad_error(400, "invalid_request", 70002, "Invalid client_assertion_type.")
        problem = _check_assertion(assertion, client_id, token_endpoint, core.clock())
        if problem:
            return _aad_error(401, "invalid_client", 700027, f"Client assertion failed: {problem}.")
    elif secret is None:
        return _aad_error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )
    elif not hmac.compare_digest(secret.encode(), core.config.client_secret.encode()):
        return _aad_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request "
            f"is the client secret value, not the client secret ID, for a secret added to "
            f"app '{client_id}'.",
        )
    scope = fields.get("scope", "")
    audience = next((a for a in core.config.audiences if scope.strip() == f"{a}/.default"), None)
    if audience is None:
        return _aad_error(
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows "
            "must have a scope value with /.default suffixed to the resource identifier.",
        )
    now = int(core.clock())
    ttl = int(core.config.aad_ttl_s)
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": f"https://sts.windows.net/{core.config.tenant_id}/",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "appid": client_id,
        "appidacr": "2" if assertion else "1",
        "tid": core.config.tenant_id,
        "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
        "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id)),
        "roles": ["Application.ReadWrite.All"],
        "ver": "1.0",
        "uti": uuid.uuid4().hex[:22],
    }
    access_token = core.aad.issue(claims)
    if core.issued is not None:
        core.issued.aad.append(access_token)
    return web.json_response(
        {
            "token_type": "Bearer",
            "expires_in": ttl,
            "ext_expires_in": ttl,
            "access_token": access_token,
        }
    )


def _check_assertion(assertion: str, client_id: str, token_endpoint: str, now: float) -> str | None:
    ident = client_identity()
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        return "malformed assertion"
    if (
        _b64(header.get("x5t")) != ident.thumbprint
        and _b64(header.get("x5t#S256")) != ident.thumbprint_sha256
    ):
        return "unknown certificate thumbprint"
    public = x509.load_pem_x509_certificate(ident.cert_pem).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        claims = jwt.decode(
            assertion,
            public,
            algorithms=["RS256", "PS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
        )
    except jwt.PyJWTError:
        return "bad signature"
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return "iss and sub must be the client id"
    aud = claims.get("aud")
    if not isinstance(aud, str) or quote(aud.lower(), safe=":/.") != quote(
        token_endpoint.lower(), safe=":/."
    ):
        return "aud must be the token endpoint"
    if float(claims.get("exp", 0)) < now - 300:
        return "assertion expired"
    return None


def _b64(value: object) -> str | None:
    """The hex form of a base64url thumbprint header (``None`` when absent or malformed)."""
    if not isinstance(value, str):
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex().upper()
    except ValueError:
        return None
