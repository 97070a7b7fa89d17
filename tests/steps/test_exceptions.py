from anonjoin import AnonJoinError, MaybeSentError, ProtocolError, ServiceError, TransportError
from anonjoin._exceptions import clip_body, redact, redact_url

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_tree() -> None:
    assert issubclass(MaybeSentError, TransportError)
    assert issubclass(TransportError, AnonJoinError)
    assert issubclass(ServiceError, AnonJoinError)


def test_redact_removes_tokens_and_secrets() -> None:
    text = f"Authorization: Bearer psat={JWT} client_secret=hunter2&x=1 token: {JWT}"
    out = redact(text)
    assert JWT not in out
    assert "hunter2" not in out
    assert "[redacted]" in out


def test_redact_url_drops_query() -> None:
    url = "https://pool.example/platformService/discover?anonymousContext=psat%253deyJabc.def.ghi"
    assert redact_url(url) == "https://pool.example/platformService/discover"


def test_service_error_message_is_clean() -> None:
    err = ServiceError(
        step="token",
        status=403,
        code="Forbidden",
        subcode="InvalidToken",
        body=f'{{"token": "psat={JWT}"}}',
        correlation_id="c-1",
    )
    assert JWT not in str(err)
    assert JWT not in repr(err)
    assert JWT not in err.body
    assert "correlation-id=c-1" in str(err)


def test_protocol_error_clips_body() -> None:
    err = ProtocolError("bad json", step="discover", status=200, body=b"x" * 10_000)
    assert len(err.body) < 400
    assert clip_body(None) == ""
