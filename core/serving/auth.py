"""Who may call the server: loopback by default; any other address needs a key
(or `--insecure` on purpose). A key, once set, is checked on every route but
health and metrics, in constant time, and never logged."""

from __future__ import annotations

import hmac
import ipaddress

from mk.core.errors import BadInput

# Probes and scrapers call these without credentials.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/health", "/metrics"})


def bare_host(host: str) -> str:
    """An address as given to `--host`: `[::1]`, as URLs write IPv6, is the address `::1`."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if is_loopback(host) or api_key or insecure:
        return
    raise BadInput(f"--host {host}: reachable from the network, and no API key is set",
                   hint="pass --api-key KEY (or set MK_API_KEY); clients then send `Authorization: Bearer KEY`. "
                        "--insecure serves without one on purpose")


def sendable(api_key: str) -> bool:
    """Whether a key can travel in an HTTP header: HTTP clients (httpx, the openai library,
    aiohttp, mk bench --url) send printable ASCII there and nothing else."""
    return api_key.isascii() and api_key.isprintable()


def check_key(api_key: str | None) -> None:
    if api_key is not None and (len(api_key) < 8 or not sendable(api_key) or " " in api_key):
        raise BadInput("--api-key: use at least 8 printable ASCII characters without spaces")


def authorized(header: bytes | None, api_key: bytes) -> bool:
    """Whether an `Authorization` header value carries the key (`Bearer KEY`)."""
    if not header or not header[:7].lower() == b"bearer ":
        return False
    return hmac.compare_digest(header[7:].strip(), api_key)
