"""Libraries anonjoin calls print nothing of their own: a failure is anonjoin's one line (issue 11).

msal logs an Azure AD answer that is not JSON (an HTML page from a proxy) with ``logger.exception``; with
no handler configured, Python's last-resort handler used to print that traceback on stderr before the
clean ``AuthError`` line.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

SECRET = "html-aad-secret-8731"


@pytest.fixture
async def html_aad(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """An Azure AD whose OpenID document is right and whose token endpoint answers 200 with HTML."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    hits: list[str] = []

    async def openid(request: web.Request) -> web.Response:
        base = f"https://127.0.0.1:{request.url.port}/contoso.com"
        return web.json_response(
            {
                "issuer": base,
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            }
        )

    async def token(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="<html><body>a proxy's page</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/contoso.com/v2.0/.well-known/openid-configuration", openid)
    app.router.add_post("/contoso.com/oauth2/v2.0/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", str(ca_file)
    finally:
        await runner.cleanup()
    assert hits, "the token endpoint was never asked: the test proves nothing"


async def _join(base: str, ca_file: str, *extra: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    env["ANONJOIN_CLIENT_SECRET"] = SECRET
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "join",
        "--discover-url", f"{base}/platformservice/discover", "--authority", f"{base}/contoso.com",
        "--client-id", "app", "--endpoint-id", "sip:app@contoso.com", "--ca-file", ca_file,
        "--meeting-url", "https://meet.example/contoso/org/ABC", "--origin", "https://app.contoso.com",
        *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert SECRET not in (out + err).decode()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_html_from_azure_ad_is_one_line_without_a_traceback(html_aad: tuple[str, str]) -> None:
    code, err = await _join(*html_aad)
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anonjoin join: AuthError: invalid_response"), err


async def test_with_verbose_the_library_logs_are_shown(html_aad: tuple[str, str]) -> None:
    """The quieting is what -v lifts: msal's own record reaches stderr (so the test above can fail)."""
    code, err = await _join(*html_aad, "-v")
    assert code == 1
    assert "Token response is not in json format" in err
