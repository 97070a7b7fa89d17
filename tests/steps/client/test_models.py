"""Wire models: every documented variant parses; bad input is a ProtocolError naming the step."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from anonjoin import ProtocolError
from anonjoin._async.http import parse_retry_after
from anonjoin._core.models import (
    ApplicationBody,
    DiscoverBody,
    EventsBody,
    TokenBody,
    conference_id_from,
    find_href,
    parse_body,
    parse_date,
    psat_claims,
    resolve,
)

from support.fake import CONF, make_psat

BASE = URL("https://ring.example.com/platformService/v1/applications")


@pytest.mark.parametrize(
    "value",
    [
        "/Date(1488872625837)/",
        "\\/Date(1488872625837)\\/",
        "/Date(1488872625837+0000)/",
        "2017-03-07T07:43:45.837Z",
        "2017-03-07T07:43:45.837+00:00",
        1488872625837,
        1488872625.837,
    ],
)
def test_dates(value: object) -> None:
    assert parse_date(value) == datetime(2017, 3, 7, 7, 43, 45, 837000, tzinfo=UTC)


def test_escaped_date_inside_json() -> None:
    body = b'{"token": "psat=x", "expiryTime": "\\\\/Date(1488872625837)\\\\/", "_links": {}}'
    expiry = parse_body(TokenBody, body, step="anon_tokens").expiry_time
    assert expiry is not None and expiry.year == 2017


@pytest.mark.parametrize("prefix", ["service:", "ms:rtc:saas:", ""])
def test_relation_prefixes(prefix: str) -> None:
    body = json.dumps({"_links": {f"{prefix}applications": {"href": "/x"}}}).encode()
    d = parse_body(DiscoverBody, body, step="discover")
    assert find_href(d.links, "applications") == "/x"
    body = json.dumps({"_links": {f"{prefix}myApplications": {"href": "/y"}}}).encode()
    assert (
        find_href(parse_body(DiscoverBody, body, step="discover").links, "applications", "myApplications")
        == "/y"
    )


def test_pascal_case_token_and_unknown_fields() -> None:
    body = b'{"Token": "psat=a", "ExpiryTime": "2030-01-01T00:00:00Z", "_links": {}, "newField": [1, 2]}'
    t = parse_body(TokenBody, body, step="anon_tokens")
    assert t.token == "psat=a" and t.expiry_time is not None and t.expiry_time.year == 2030


def test_relative_and_absolute_hrefs() -> None:
    assert str(resolve(BASE, "/ucwa/x?ack=1", step="s")) == "https://ring.example.com/ucwa/x?ack=1"
    assert str(resolve(BASE, "other", step="s")) == "https://ring.example.com/platformService/v1/other"
    assert str(resolve(BASE, "https://pool.example.com/p", step="s")) == "https://pool.example.com/p"
    # the double-encoded psat survives untouched
    assert "psat%253dabc" in str(resolve(BASE, "/d?anonymousContext=psat%253dabc", step="s"))


@pytest.mark.parametrize(
    "href", ["file:///etc/passwd", "javascript:alert(1)", "ftp://h/x", "data:text/plain,hi", "http:/x"]
)
def test_non_http_hrefs_are_refused(href: str) -> None:
    with pytest.raises(ProtocolError) as info:
        resolve(BASE, href, step="anon_discover")
    assert info.value.step == "anon_discover"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{",
        b"[]",
        b'{"_links": []}',
        b'{"_links": {"self": "x"}}',
        b'{"_links": {"self": {"href": 5}}}',
        b'{"sender": {"rel": 1}}',
        b'{"sender": [{"rel": "c", "events": [{"type": "added"}]}]}',
        b"\xff\xfe",
    ],
)
def test_malformed_bodies_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_body(EventsBody, body, step="events", status=200)
    assert info.value.step == "events" and info.value.status == 200


def test_confid_from_psat() -> None:
    assert psat_claims(make_psat("a", 60))["confid"] == CONF
    assert psat_claims("psat=garbage") == {}
    assert psat_claims("psat=a.!!!.c") == {}
    assert conference_id_from("https://meet.lync.com/contoso/testuser/1SD8D0WZ") == "1SD8D0WZ"


def test_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None
    later = parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT")
    assert later is not None and later > 1e8


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["_links", "_embedded", "sender", "token", "expiryTime", "id", "conferenceId", "x"]),
        json_values,
        max_size=5,
    )
)
def test_any_json_gives_a_model_or_a_protocol_error(doc: dict[str, object]) -> None:
    body = json.dumps(doc).encode()
    for model in (DiscoverBody, TokenBody, ApplicationBody, EventsBody):
        try:
            parse_body(model, body, step="events")
        except ProtocolError as exc:
            assert exc.step == "events"


@settings(deadline=None)
@given(st.text(max_size=60))
def test_any_href_resolves_to_http_or_raises(href: str) -> None:
    try:
        url = resolve(BASE, href, step="s")
    except ProtocolError:
        return
    assert url.scheme in ("http", "https") and url.host
