"""The SSRF guard: callbacks go only to public addresses, unless allowed.

A URL must be http or https. Its host is resolved when the call is made, every
address it resolves to is checked, and the request is then sent to the checked
address itself (with the original ``Host`` header and TLS server name), so a
second DNS answer cannot point it elsewhere. Loopback, private, link-local,
CGNAT, multicast, reserved and unspecified addresses, IPv6 unique-local and
link-local ones, and IPv4-mapped or -translated IPv6 forms are refused unless
a network in ``WEBHOOK_ALLOWED_NETWORKS`` contains them.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import idna

__all__ = [
    "AddressRefused",
    "IPAddress",
    "IPNetwork",
    "check_address",
    "literal_address",
    "normalize_url",
    "parse_networks",
    "resolve_checked",
    "validate_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class AddressRefused(Exception):
    """A callback URL or the address it resolves to may not be called.

    :param reason: what is wrong, for the attempt log and the 422 answer
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (``127.0.0.0/8``, ``::1/128``, ``10.1.2.3``) as networks."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip())


def _refusal(address: IPAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address in _NAT64 or address in _NAT64_LOCAL or address.sixtofour is not None:
            return "an IPv6 address that embeds an IPv4 one"
        if address.teredo is not None:
            return "a Teredo address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def check_address(address: IPAddress, allowed: Sequence[IPNetwork]) -> None:
    """Raise :class:`AddressRefused` unless ``address`` may be called."""
    if any(address.version == net.version and address in net for net in allowed):
        return
    reason = _refusal(address)
    if reason is not None:
        raise AddressRefused(
            f"{address} is {reason}; allow it with WEBHOOK_ALLOWED_NETWORKS if it is meant"
        )


#: What a host written as a number can hold (decimal, octal, hex, dots, IPv6).
_NUMERIC = re.compile(r"^[0-9a-fA-FxX.:]+$")


@functools.lru_cache(maxsize=4096)  # a pure function of ``host`` (no DNS), asked per callback
def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address, if it is written as one in any spelling
    the system's resolver reads as a number (``2130706433``, ``0x7f000001``,
    ``0177.0.0.1``, ``127.1``, ``0``): parsed by that resolver itself
    (``getaddrinfo`` with ``AI_NUMERICHOST``, no DNS), so the check at
    registration and the sender never read a host two ways."""
    # A trailing dot ("127.0.0.1.") is how a name is made absolute; some
    # resolvers read the rest as the number it spells, so it is one here too.
    bare = host.strip("[]").removesuffix(".")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if not _NUMERIC.match(bare):
        return None
    try:
        infos = socket.getaddrinfo(bare, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(infos[0][4][0]).split("%")[0])


_LOOPBACK = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def _loopback_name(host: str) -> bool:
    """``localhost`` and its subdomains (RFC 6761), with or without the
    trailing dot: loopback on every resolver, so judged without DNS."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


_ASCII_HOST = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
#: What may stay as it is in a path or query; anything else is percent-encoded.
_URL_SAFE = "/%:@!$&'()*+,;=-._~?"


def _ascii_host(host: str) -> str:
    """``host`` as the ASCII name DNS and the ``Host`` header take: an
    internationalized or look-alike Unicode name through IDNA (UTS #46), so
    fullwidth ``localhost`` is ``localhost`` and is checked as such."""
    if literal_address(host) is not None:
        return host
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise AddressRefused(f"the host is not a valid domain name: {exc}") from None
    host = host.lower()
    if not _ASCII_HOST.match(host) or len(host) > 253:
        raise AddressRefused(f"the host {host!r} is not a valid domain name")
    return host


def normalize_url(url: str) -> str:
    """``url`` in the one form the gateway stores and calls: ASCII host
    (IDNA), lower case, path and query percent-encoded, no fragment.

    :raises AddressRefused: not an http(s) URL with a valid host
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise AddressRefused(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise AddressRefused("only http and https URLs can be called")
    if not parts.hostname:
        raise AddressRefused("the URL has no host")
    if parts.username or parts.password:
        raise AddressRefused("credentials in the URL are not supported; use a header or a path")
    host = _ascii_host(parts.hostname)
    address = literal_address(host)
    if address is not None:  # one spelling of an address: the usual one
        host = str(address)
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit(
        (
            parts.scheme.lower(),
            netloc,
            quote(parts.path, safe=_URL_SAFE),
            quote(parts.query, safe=_URL_SAFE),
            "",
        )
    )


def validate_url(url: str, allowed: Sequence[IPNetwork]) -> str:
    """Check what can be checked without DNS (scheme, host, a literal
    address); returns the URL in its normal form (:func:`normalize_url`)."""
    normal = normalize_url(url)
    parts = urlsplit(normal)
    if parts.port == 0:
        raise AddressRefused("port 0 cannot be called")
    address = literal_address(parts.hostname or "")
    if address is not None:
        check_address(address, allowed)
    elif _loopback_name(parts.hostname or ""):
        # What every resolver answers for it, checked as the sender would.
        for loopback in _LOOPBACK:
            check_address(loopback, allowed)
    return normal


async def resolve_checked(host: str, port: int, allowed: Sequence[IPNetwork]) -> IPAddress:
    """Resolve ``host`` and check every address; return the one to connect to.

    Every address must pass: a name that resolves to one public and one
    private address is refused, so a receiver cannot steer us by DNS order.
    """
    literal = literal_address(host)
    if literal is not None:
        check_address(literal, allowed)
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressRefused(f"cannot resolve {host}: {exc.strerror}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise AddressRefused(f"{host} resolves to no address")
    for address in addresses:
        check_address(address, allowed)
    return addresses[0]
