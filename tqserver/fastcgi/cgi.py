"""The CGI side of a PHP request: which script under public/ a URL runs (and its
PATH_INFO), and the CGI/1.1 environment php-fpm gets for it (RFC 3875, with the extras
nginx's fastcgi_params add and PHP applications rely on)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

import attrs

from tqserver import __version__
from tqserver.proxy.static import within

INDEX = "index.php"
SERVER_SOFTWARE = b"TQServer/" + __version__.encode()
Params = list[tuple[bytes, bytes]]
_SEGMENT = re.compile(r"[^/]+")


@attrs.frozen
class Script:
    filename: str  # the .php file's real path (SCRIPT_FILENAME)
    name: str  # its URL path below the route: "/x.php", "/admin/index.php"
    path_info: str  # the decoded rest of the URL after it ("" when none)
    root: str = ""  # public/'s real path (DOCUMENT_ROOT)


def resolve_script(public_dir: str, subpath: bytes) -> Script | None:
    """The script a prefix-stripped, still percent-encoded path runs:

    - ``/x.php`` and ``/x.php/extra`` run x.php (PATH_INFO ``/extra``);
    - ``/`` and ``/dir/`` run that directory's index.php;
    - any other path (not a static file: those never get here) runs public/index.php,
      the front controller, with the whole path as PATH_INFO.

    Only real ``.php`` files inside public/ qualify, never through a hidden name or a
    symlink out. None when nothing qualifies (no index.php) or the path is malformed.
    """
    decoded = os.fsdecode(unquote_to_bytes(subpath))
    if "\x00" in decoded or "\\" in decoded:
        return None
    root = os.path.realpath(public_dir)
    segments: list[str] = []
    for match in _SEGMENT.finditer(decoded):
        segments.append(match.group())
        if match.group().endswith(".php"):
            found = _script_file(root, segments)
            if found is not None:
                return Script(found, "/" + "/".join(segments), decoded[match.end() :], root)
    if decoded.endswith("/") or not segments:
        found = _script_file(root, segments + [INDEX])
        if found is not None:
            return Script(found, "/" + "/".join(segments + [INDEX]), "", root)
    found = _script_file(root, [INDEX])
    if found is None:
        return None
    return Script(found, "/" + INDEX, decoded, root)


def _script_file(root: str, segments: list[str]) -> str | None:
    if any(s.startswith(".") for s in segments):
        return None
    real = os.path.realpath(os.path.join(root, *segments))
    if not real.endswith(".php") or not within(root, real) or not os.path.isfile(real):
        return None
    return real


def _header_key(name: bytes) -> bytes:
    return b"HTTP_" + name.upper().replace(b"-", b"_")


def cgi_params(
    request, script: Script, route: str, forwarded: Sequence[tuple[bytes, bytes]], skip: frozenset
) -> Params:
    """The FastCGI PARAMS of ``request`` running ``script``.

    What nginx + php-fpm give an application mounted at a sub-path: REQUEST_URI is the
    client's (route prefix and query included), SCRIPT_NAME carries the prefix too, and
    DOCUMENT_URI (like PHP_SELF) is SCRIPT_NAME + PATH_INFO, so applications compute their
    base URL and cookie paths right. X-Forwarded-Prefix is not passed: the prefix is in
    those already, and frameworks that honour the header would add it a second time.
    Request headers become HTTP_* except those in ``skip`` (hop-by-hop, the client's
    X-Forwarded-*) and names with '_' (HTTP_X_A could be X-A or X_A: nginx drops them
    too); ``forwarded`` (this proxy's X-Forwarded-*, X-Request-ID) are added, and
    HTTP_PROXY never exists (httpoxy: the Proxy header is hop-by-hop here)."""
    fs = os.fsencode
    document_root = script.root
    prefix = "" if route == "/" else route
    _path, sep, query = request.uri.partition(b"?")
    uri = request.uri if request.uri[:1] == b"/" else request.path + sep + query
    secure = request.isSecure()
    client = request.getClientAddress()
    local = request.getHost()
    host = (request.requestHeaders.getRawHeaders(b"host") or [b""])[0]
    params: Params = [
        (b"GATEWAY_INTERFACE", b"CGI/1.1"),
        (b"SERVER_SOFTWARE", SERVER_SOFTWARE),
        (b"SERVER_PROTOCOL", request.clientproto),
        (b"REQUEST_METHOD", request.method),
        (b"REQUEST_URI", uri),
        (b"QUERY_STRING", query),
        (b"REQUEST_SCHEME", b"https" if secure else b"http"),
        (b"DOCUMENT_ROOT", fs(document_root)),
        (b"DOCUMENT_URI", fs(prefix + script.name + script.path_info)),
        (b"SCRIPT_FILENAME", fs(script.filename)),
        (b"SCRIPT_NAME", fs(prefix + script.name)),
        (b"PATH_INFO", fs(script.path_info)),
        (b"REMOTE_ADDR", _host(client)),
        (b"REMOTE_PORT", _port(client)),
        (b"SERVER_ADDR", _host(local)),
        (b"SERVER_PORT", _port(local)),
        (b"SERVER_NAME", _server_name(host) or _host(local)),
        (b"REDIRECT_STATUS", b"200"),  # php-cgi's force_redirect check expects it
    ]
    if script.path_info:
        params.append((b"PATH_TRANSLATED", fs(document_root + script.path_info)))
    if secure:
        params.append((b"HTTPS", b"on"))
    headers = request.requestHeaders
    for name, key in ((b"content-type", b"CONTENT_TYPE"), (b"content-length", b"CONTENT_LENGTH")):
        value = headers.getRawHeaders(name)
        if value:
            params.append((key, value[0]))
    http: dict[bytes, bytes] = {}
    for name, values in headers.getAllRawHeaders():
        lname = name.lower()
        if lname in skip or lname in (b"content-type", b"content-length") or b"_" in lname:
            continue
        joiner = b"; " if lname == b"cookie" else b", "
        http[_header_key(name)] = joiner.join(values)
    for name, value in forwarded:
        if name.lower() != b"x-forwarded-prefix":
            http[_header_key(name)] = value
    params.extend(http.items())
    return params


def _host(address) -> bytes:
    return str(getattr(address, "host", "") or "").encode()


def _port(address) -> bytes:
    port = getattr(address, "port", None)
    return b"" if port is None else str(port).encode()


def _server_name(host: bytes) -> bytes:
    """The Host header without its port ('[::1]:80' -> '[::1]')."""
    if host.startswith(b"["):
        return host.partition(b"]")[0] + b"]"
    return host.rpartition(b":")[0] if b":" in host else host
