"""Where a webhook may go: an http(s) URL whose host resolves only to public addresses.

A client names the URL, and the server POSTs to it: without a check, anyone who may submit a job could make
the server send requests into its own network (its loopback services, a cloud's metadata address, private
hosts). So the URL must be http or https, and every address its host resolves to must be a public one (not
loopback, private, link-local, multicast, reserved or unspecified; an IPv4 address inside IPv6 is checked as
the IPv4 one). It is checked at submission and again at each delivery, since DNS answers can change; the
delivery then connects to the address it checked (``pinned``), so a name cannot resolve one way for the check
and another for the connection. ``segue serve --allow-private-webhooks`` lifts the address rule, for
receivers on the same machine or network.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL = 2048
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetError(ValueError):
    """A webhook URL that may not be used; its message is one line naming webhook_url."""


def check_url(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL of at most ``MAX_URL`` characters; TargetError otherwise."""
    try:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        u, port = None, 0
    if len(url) > MAX_URL or u is None or u.scheme not in ("http", "https") or not u.hostname:
        raise TargetError(f"webhook_url must be an http:// or https:// URL of at most {MAX_URL} characters, "
                          f"got {url!r:.60}")  # fmt: skip
    return u.hostname, port


def refusal(address: Address) -> str | None:
    """Why a webhook may not go to ``address`` (a kind of address), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, hit in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                      ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                      ("reserved", address.is_reserved), ("private", address.is_private),
                      ("non-public", not address.is_global)):  # fmt: skip
        if hit:
            return kind
    return None


def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (an IP literal: itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise TargetError(f"webhook_url: its host {host!r:.60} does not resolve ({e})") from None
    out: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in out:
            out.append(address)
    return out


def check_target(url: str, allow_private: bool = False) -> list[Address]:
    """The addresses a webhook to ``url`` may be sent to; TargetError when the URL or any address is refused."""
    host, port = check_url(url)
    if allow_private:
        return []
    addresses = resolve(host, port)
    if not addresses:
        raise TargetError(f"webhook_url: its host {host!r:.60} resolves to no address")
    for address in addresses:
        why = refusal(address)
        if why is not None:
            raise TargetError(f"webhook_url: its host {host!r:.60} resolves to {address}, which is {why}; "
                              "webhooks go to public addresses only (segue serve --allow-private-webhooks "
                              "lifts this)")  # fmt: skip
    return addresses


def pinned(url: str, address: Address) -> tuple[str, dict[str, str], dict[str, str]]:
    """``url`` with its host replaced by ``address``, the Host header it had, and the TLS server name (so an
    https certificate is still checked against the name)."""
    u = urlsplit(url)
    ip = f"[{address}]" if address.version == 6 else str(address)
    userinfo, at, host_header = u.netloc.rpartition("@")
    netloc = userinfo + at + (ip if u.port is None else f"{ip}:{u.port}")
    target = u._replace(netloc=netloc).geturl()
    return target, {"Host": host_header}, {"sni_hostname": u.hostname or ""} if u.scheme == "https" else {}
