"""Key functions: who (or what) a request counts against.

A key function takes the ASGI ``scope`` and returns a string, or None for "no key"
(the request is then not limited). Every value is length-capped and normalised, so a
client cannot mint unbounded keys.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Final

from resilience.integrations.asgi._asgi import Scope, values
from resilience.integrations.asgi._asgi import first as first_header

__all__ = [
    "BAD_FORWARDED",
    "NO_PEER",
    "KeyFunc",
    "client_ip",
    "first",
    "header",
    "join",
    "path_template",
]

KeyFunc = Callable[[Scope], "str | None"]

MAX_KEY: Final = 128  # characters of any single key part
#: client_ip's key for a request whose peer is not an IP address: no peer at all (a Unix
#: socket), or a test client's name. Such requests share one bucket per peer name.
NO_PEER: Final = "peer:none"
#: client_ip's key when the forwarded address it must use is not an address.
BAD_FORWARDED: Final = "peer:invalid-forwarded"

log = logging.getLogger("resilience.integrations.asgi")
_DIRECT_MAX: Final = 8192


def _cap(value: str) -> str:
    return value[:MAX_KEY]


# Parsing an address costs microseconds; the same few addresses recur, so remember them
# (bounded: forwarded headers are attacker-controlled).
@functools.lru_cache(maxsize=8192)
def _ip(text: str, v6_prefix: int | None) -> str | None:
    """A normalised address, or None when ``text`` is not one."""
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if v6_prefix is not None:  # one client often owns a whole /64
            return str(ipaddress.ip_network(f"{address}/{v6_prefix}", strict=False))
    return str(address)


def _forwarded_for(scope: Scope, which: str) -> list[str]:
    """Addresses from the one forwarding header the proxies write, leftmost first."""
    hops: list[str] = []
    if which == "x-forwarded-for":
        for raw in values(scope.get("headers", ()), b"x-forwarded-for"):
            hops.extend(part.strip() for part in raw.decode("latin-1").split(","))
        return hops
    for raw in values(scope.get("headers", ()), b"forwarded"):
        for element in raw.decode("latin-1").split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    hops.append(value)
    return hops


def client_ip(
    trusted_proxies: Iterable[str] = (),
    *,
    trusted_hops: int = 0,
    ipv6_prefix: int | None = 64,
    forwarded_header: str = "x-forwarded-for",
) -> KeyFunc:
    """The client's address, reading ``X-Forwarded-For`` / ``Forwarded`` only from proxies
    you trust.

    With ``trusted_proxies`` (addresses or networks), the chain is walked right to left
    from the socket peer, skipping trusted proxies; the first untrusted address is the
    client. With ``trusted_hops=N``, the Nth address from the right is taken (N proxies
    you control). Headers from an untrusted peer are ignored: the peer itself is the
    client. IPv6 clients are keyed by their ``/ipv6_prefix`` network (None: full address).
    A request whose peer is not an IP address is never left unkeyed: it is keyed by
    ``"peer:<name>"`` (Starlette's TestClient: ``"peer:testclient"``), or ``NO_PEER``
    when there is no peer (a Unix socket), or ``BAD_FORWARDED`` when the forwarded
    address it must use is garbage; the first such request is logged once.
    ``forwarded_header`` names the one header your proxies write (``"x-forwarded-for"``
    or ``"forwarded"``); the other is never read, so a client cannot supply it.
    """
    which = forwarded_header.lower() if isinstance(forwarded_header, str) else ""
    if which not in ("x-forwarded-for", "forwarded"):
        raise ValueError(
            f"forwarded_header must be 'x-forwarded-for' or 'forwarded', got {forwarded_header!r}"
        )
    networks = []
    for proxy in trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(proxy, strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {proxy!r} is not an address or network") from None
    if isinstance(trusted_hops, bool) or not isinstance(trusted_hops, int) or trusted_hops < 0:
        raise ValueError(f"trusted_hops must be an int >= 0, got {trusted_hops!r}")
    if networks and trusted_hops:
        raise ValueError("pass trusted_proxies or trusted_hops, not both")
    if ipv6_prefix is not None and not (
        isinstance(ipv6_prefix, int)
        and not isinstance(ipv6_prefix, bool)
        and 1 <= ipv6_prefix <= 128
    ):
        raise ValueError(f"ipv6_prefix must be None or 1..128, got {ipv6_prefix!r}")

    def trusted(address: str) -> bool:
        normal = _ip(address, None)  # unmaps ::ffff:a.b.c.d from dual-stack listeners
        if normal is None:
            return False
        ip = ipaddress.ip_address(normal)
        return any(ip in net for net in networks)

    warned = False

    def stand_in(key: str, why: str) -> str:
        # Never "no key": that would switch limiting off for every such request.
        nonlocal warned
        if not warned:
            warned = True
            log.warning(
                "client_ip: %s; such requests share the key %r",
                why,
                key,
                extra={"resilience_event": "asgi.client_ip_stand_in"},
            )
        return key

    # The socket peer's key when no header is read (no proxies configured): peers recur,
    # and a dict lookup is cheaper than the parse cache. Bounded: cleared when full.
    direct: dict[str, str] = {}
    reads_headers = bool(trusted_hops or networks)

    def key(scope: Scope) -> str:
        peer = scope.get("client")
        peer_ip = peer[0] if peer else None
        if peer_ip.__class__ is not str and peer_ip is not None:
            peer_ip = str(peer_ip)
        if not reads_headers and peer_ip is not None:
            known = direct.get(peer_ip)
            if known is not None:
                return known
        if trusted_hops:
            hops = _forwarded_for(scope, which)
            if peer_ip is not None:
                hops.append(peer_ip)
            # The last trusted_hops entries are our proxies; the one before is the client.
            chosen = (
                hops[-trusted_hops - 1] if len(hops) > trusted_hops else hops[0] if hops else None
            )
            if chosen is None:
                return stand_in(NO_PEER, "a request with no peer address and no forwarded chain")
            found = _ip(chosen, ipv6_prefix)
            if found is None:
                return stand_in(BAD_FORWARDED, f"forwarded address {chosen[:40]!r} is not an IP")
            return found
        if peer_ip is None:
            return stand_in(NO_PEER, "a request with no peer address (a Unix socket?)")
        own = _ip(peer_ip, ipv6_prefix)
        if own is None:
            named = f"peer:{_cap(peer_ip)}"
            return stand_in(named, f"peer {peer_ip[:40]!r} is not an IP address")
        if not networks:
            if len(direct) >= _DIRECT_MAX:
                direct.clear()
            direct[peer_ip] = own
            return own
        if not trusted(peer_ip):
            return own  # an untrusted peer's headers mean nothing
        candidate = peer_ip
        for hop in reversed(_forwarded_for(scope, which)):
            address = _ip(hop, None)
            if address is None:
                break  # garbage in the chain: stop at the last good hop
            candidate = address
            if not trusted(address):
                break
        return _ip(candidate, ipv6_prefix) or own  # candidate parsed above: never None

    return key


def header(name: str) -> KeyFunc:
    """The value of request header ``name`` (capped), or None when absent or empty."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty header name, got {name!r}")
    wanted = name.lower().encode("latin-1")

    def key(scope: Scope) -> str | None:
        value = first_header(scope.get("headers", ()), wanted)
        text = "" if value is None else value.decode("latin-1").strip()
        return _cap(text) if text else None  # an empty header is no key, not an error

    return key


def path_template(*, unmatched: str = "<unmatched>") -> KeyFunc:
    """The matched route's template (``/users/{id}``), not the raw path, so every user id
    shares one key. Routes come from the Starlette or FastAPI app in ``scope["app"]``;
    paths that match no route share ``unmatched``.
    """

    def key(scope: Scope) -> str | None:
        app = scope.get("app")
        for route in getattr(app, "routes", ()):
            try:
                match, child = route.matches(scope)
            except Exception:
                continue
            if getattr(match, "name", "") == "FULL":
                template = getattr(route, "path", None) or child.get("route", None)
                return _cap(str(template)) if template is not None else unmatched
        return unmatched

    return key


def join(*parts: KeyFunc, sep: str = "|") -> KeyFunc:
    """All parts joined (e.g. route and client); None if any part is None."""
    if not parts:
        raise ValueError("join needs at least one key function")

    def key(scope: Scope) -> str | None:
        values = []
        for part in parts:
            value = part(scope)
            if value is None:
                return None
            values.append(value)
        return sep.join(values)

    return key


def first(*parts: KeyFunc) -> KeyFunc:
    """The first part that is not None (e.g. an API key, else the client address)."""
    if not parts:
        raise ValueError("first needs at least one key function")

    def key(scope: Scope) -> str | None:
        for part in parts:
            value = part(scope)
            if value is not None:
                return value
        return None

    return key
