"""Request and response headers the proxy treats specially, and request ids."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus httpoxy's `Proxy`.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy",
    ]
)
_FORWARDED = frozenset(
    [
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"x-request-id",
        b"x-tqserver-relay",
    ]
)
# Request headers never relayed as they are (Transfer-Encoding: the body is re-framed).
_NOT_RELAYED = HOP_BY_HOP | _FORWARDED
# Response headers never relayed from the worker (X-Request-ID: the proxy sets its own).
_NOT_RELAYED_BACK = HOP_BY_HOP | {b"x-request-id"}


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The tokens of Connection header values, lowercased: ``close, TE`` is {close, te}
    (twisted.web's HTTPChannel splits on spaces only)."""
    return frozenset(
        token for value in values for t in value.split(b",") if (token := t.strip().lower())
    )


# What Connection may never take out of a message: its framing and Host. A sender names
# only hop-by-hop fields there (RFC 9110 7.6.1); dropping "Connection: Content-Length" from a
# request forwarded its body with no length (the proxy then held all of it in memory).
_NEVER_NAMED = frozenset([b"content-length", b"transfer-encoding", b"host"])


def named_in_connection(values: Iterable[bytes]) -> frozenset[bytes]:
    """The fields a message's Connection values make hop-by-hop (not forwarded): its
    tokens, less the framing fields and Host, which are never removed."""
    return connection_tokens(values) - _NEVER_NAMED


_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")


_ID_PREFIX = os.urandom(11).hex().encode()  # 22 hex + 10 of counter = 32, like a uuid
_id_counter = itertools.count(1)


def next_request_id() -> bytes:
    """Unique per process run: a random prefix and a counter (cheaper than a uuid4 per
    request, which showed in profiles)."""
    return b"%s%010x" % (_ID_PREFIX, next(_id_counter))
