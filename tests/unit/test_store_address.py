"""Store address parsing, reachability probes, sizes and the Mooncake error table."""

from __future__ import annotations

import socket
import time

import pytest

from specctl.config import parse_size
from specctl.errors import StoreError, StoreUnavailable, UsageError
from specctl.store import address, objects

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text,host,port",
    [
        ("127.0.0.1:29600", "127.0.0.1", 29600),
        ("localhost:1", "localhost", 1),
        ("[::1]:8080", "::1", 8080),
        (" node-3.cluster:65535 ", "node-3.cluster", 65535),
    ],
)
def test_parse_good(text: str, host: str, port: int) -> None:
    assert address.parse(text) == address.Address(host, port)


@pytest.mark.parametrize("text", ["", "nonsense", "host:", ":80", "host:0", "host:70000", "h:8x"])
def test_parse_malformed_is_a_one_line_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=r"store address|no store") as e:
        address.parse(text)
    assert "\n" not in str(e.value)


def test_parse_falls_back_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECCTL_STORE", "10.0.0.2:1234")
    assert address.parse(None) == address.Address("10.0.0.2", 1234)
    monkeypatch.delenv("SPECCTL_STORE")
    with pytest.raises(UsageError, match="no store address"):
        address.parse(None)


def test_probe_and_require() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert address.probe("127.0.0.1", s.getsockname()[1], 1.0)
    port = address.free_port()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        address.require("127.0.0.1", port, 0.5, "specctl store")
    assert time.monotonic() - t0 < 5


def test_bind_listener_refuses_a_taken_port() -> None:
    first = address.bind_listener("127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match="cannot bind"):
            address.bind_listener("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_loopback() -> None:
    assert address.is_loopback("127.0.0.1") and address.is_loopback("::1")
    assert address.is_loopback("localhost")
    assert not address.is_loopback("0.0.0.0") and not address.is_loopback("192.0.2.7")


@pytest.mark.parametrize(
    "text,n",
    [
        ("4GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("1g", 1 << 30),
        ("1.5KiB", 1536),
        ("1000", 1000),
        ("2MB", 2_000_000),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "4XB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_every_mooncake_code_has_a_clear_message() -> None:
    for code in (-1, -200, -600, -704, -706, -800, -900):
        assert objects.describe(code).endswith(f"[{code}]")
    assert "full" in objects.describe(-200)
    assert "master" in objects.describe(-900)
    assert "HA" in objects.describe(-1003) and "file" in objects.describe(-1101)
    assert objects.check(5, "get") == 5
    with pytest.raises(StoreError, match=r"put 'k': object not found \[-704\]"):
        objects.check(-704, "put 'k'")
