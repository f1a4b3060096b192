"""The SSRF guard's address rules, and resolution at send time."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from webhooks.ssrf import (
    AddressRefused,
    check_address,
    parse_networks,
    resolve_checked,
    validate_url,
)

REFUSED = {
    "127.0.0.1": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.0.1": "private",
    "169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "100.64.0.1": "carrier-grade NAT",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "240.0.0.1": "reserved",
    "fd12:3456::1": "private",
    "::ffff:8.8.8.8": "IPv4-mapped",
    "64:ff9b::808:808": "embeds an IPv4",
    "2002:0808:0808::1": "embeds an IPv4",
    "198.18.0.1": "private",
}


@pytest.mark.parametrize(("address", "kind"), REFUSED.items())
def test_non_public_addresses_are_refused(address: str, kind: str) -> None:
    with pytest.raises(AddressRefused, match=kind):
        check_address(ipaddress.ip_address(address), ())


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    check_address(ipaddress.ip_address(address), ())


def test_allowed_networks_let_an_address_through() -> None:
    allowed = parse_networks(["127.0.0.0/8", "10.0.0.0/24"])
    check_address(ipaddress.ip_address("127.0.0.5"), allowed)
    check_address(ipaddress.ip_address("10.0.0.9"), allowed)
    with pytest.raises(AddressRefused):
        check_address(ipaddress.ip_address("10.0.1.9"), allowed)
    with pytest.raises(AddressRefused):  # ::1 is not in an IPv4 network
        check_address(ipaddress.ip_address("::1"), allowed)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "only http and https"),
        ("http:///nohost", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://[::ffff:10.0.0.1]/", "IPv4-mapped"),
    ],
)
def test_urls_that_cannot_be_called(url: str, reason: str) -> None:
    with pytest.raises(AddressRefused, match=reason):
        validate_url(url, ())


def test_names_are_not_resolved_at_registration() -> None:
    validate_url("https://hooks.example.com/path?x=1", ())


def test_resolution_checks_every_address() -> None:
    # "localhost" resolves to loopback addresses only: refused unless allowed.
    with pytest.raises(AddressRefused, match="loopback"):
        asyncio.run(resolve_checked("localhost", 80, ()))
    allowed = parse_networks(["127.0.0.0/8", "::1/128"])
    address = asyncio.run(resolve_checked("localhost", 80, allowed))
    assert address.is_loopback
    with pytest.raises(AddressRefused, match="cannot resolve"):
        asyncio.run(resolve_checked("no-such-host.invalid", 80, allowed))


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "0x7f.1",
        "0",
        "127.0.0.1.",
        "localhost",
        "localhost.",
        "LocalHost",
        "app.localhost",
        "".join(chr(ord(c) + 0xFEE0) for c in "localhost"),
        "".join(chr(ord(c) + 0xFEE0) for c in "127") + "." + chr(0xFF10) + ".0.1",
    ],
)
def test_every_spelling_of_loopback_is_refused_at_registration(host: str) -> None:
    """Whatever the resolver would read as a loopback (or unspecified)
    address is refused before anything is stored, not only at send time."""
    with pytest.raises(AddressRefused, match=r"loopback|unspecified"):
        validate_url(f"http://{host}:8080/hook", ())


def test_a_numeric_host_is_stored_in_its_usual_spelling() -> None:
    assert validate_url("http://0x08080808/x", ()) == "http://8.8.8.8/x"
    assert validate_url("http://134744072:81/", ()) == "http://8.8.8.8:81/"
    # A name made of hex letters is a name, not a number.
    assert validate_url("http://deadbeef/", ()) == "http://deadbeef/"
