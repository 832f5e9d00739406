"""The HTTP proxy's parser (proxies/http_connect.py): CONNECT, absolute-URI requests
rewritten to origin-form, bad heads answered with their status, and hypothesis throwing
arbitrary bytes and heads at it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_client.proxies.http_connect import (
    MAX_HEAD,
    Connect,
    Forward,
    HttpProxyError,
    HttpProxyServer,
)
from shuttle_client.proxies.socks5 import NEED_DATA
from shuttle_protocol.errors import RemoteProtocolError


def parse(*chunks: bytes) -> object:
    parser = HttpProxyServer()
    event: object = NEED_DATA
    for chunk in chunks:
        parser.receive_data(chunk)
        event = parser.next_event()
    return event


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [(b"example.com:443", "example.com", 443), (b"[fd00:5e:2::2]:8443", "fd00:5e:2::2", 8443)],
)
def test_connect(target: bytes, host: str, port: int) -> None:
    head = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
    assert parse(head, b"\r\n") == Connect(host, port)


def test_connect_keeps_what_follows_the_head() -> None:
    parser = HttpProxyServer()
    parser.receive_data(b"CONNECT a:1 HTTP/1.1\r\n\r\n\x16\x03\x01")
    assert parser.next_event() == Connect("a", 1)
    assert parser.trailing == b"\x16\x03\x01"


def test_absolute_uri_becomes_origin_form_one_request_per_connection() -> None:
    head = (
        b"GET http://repo.internal:8080/git/info/refs?service=git-upload-pack HTTP/1.1\r\n"
        b"Host: repo.internal:8080\r\nProxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n"
    )
    assert parse(head) == Forward(
        "repo.internal",
        8080,
        b"GET /git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: repo.internal:8080\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n",
    )


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # origin-form: not a proxy request
        (b"GET https://a/ HTTP/1.1\r\n\r\n", 501),
        (b"CONNECT a HTTP/1.1\r\n\r\n", 400),  # no port
        (b"CONNECT a:99999 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/2\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"G\xffT http://a/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://a b/ HTTP/1.1\r\n\r\n", 400),
        (b"X" * (MAX_HEAD + 10), 431),
    ],
)
def test_bad_requests_get_their_status(head: bytes, status: int) -> None:
    with pytest.raises(HttpProxyError) as caught:
        parse(head)
    assert caught.value.response.startswith(f"HTTP/1.1 {status} ".encode())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_fuzz_any_bytes(chunks: list) -> None:
    parser = HttpProxyServer()
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            event = parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, (Connect, Forward)) and 1 <= event.port <= 65535
                break
    except HttpProxyError as exc:
        assert exc.response.startswith(b"HTTP/1.1 4") or exc.response.startswith(b"HTTP/1.1 5")
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"CONNECT", b"GET", b"POST", b"get", b""]),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "replace")),
    st.lists(st.binary(max_size=40), max_size=5),
)
def test_fuzz_heads(method: bytes, target: bytes, headers: list) -> None:
    head = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers)
    try:
        event = parse(head + b"\r\n")
    except HttpProxyError:
        return
    if isinstance(event, Forward):
        assert event.head.endswith(b"Connection: close\r\n\r\n")
