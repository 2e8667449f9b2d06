"""The site's landing page: TQServer's workers and their state.

Each request to ``/`` reads the supervisor's ``GET /health`` JSON (at
``$TQSERVER_URL/health``, 1 s timeout) and renders it; if the supervisor
cannot be reached the page still renders, saying "status unavailable".
Any other path is a 404 page.  The stylesheet is ``public/style.css``,
served by the proxy itself at ``/style.css``.
"""
from __future__ import annotations

import os
import sys

try:
    from tqserver.worker import serve, worker_info
except ImportError:  # run by hand from a source checkout without tqserver installed
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    from tqserver.worker import serve, worker_info

HEALTH_TIMEOUT = 1.0
BLURB = ("A function-execution platform on Twisted: small web programs in Go, Python, "
         "Bun, PHP and Kotlin, each running as its own process behind one reverse "
         "proxy, rebuilt and swapped with zero downtime when their code changes.")


def _esc(value) -> str:
    return (str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def _css_class(value) -> str:
    return "".join(c for c in str(value).lower() if c.isalnum() or c == "-") or "unknown"


def _warm_up() -> None:
    """Import the fetch machinery off the start-up path (the first page is fast too)."""
    try:
        import json  # noqa: F401
        import urllib.request  # noqa: F401
    except Exception:
        pass


def fetch_status():
    """Return (health JSON dict, None) or (None, reason)."""
    base = os.environ.get("TQSERVER_URL", "").rstrip("/")
    if not base:
        return None, "TQSERVER_URL is not set"
    import json
    import urllib.error
    import urllib.request

    # No proxies: the supervisor is on loopback, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base + "/health", timeout=HEALTH_TIMEOUT) as resp:
            raw = resp.read(4 << 20)
    except urllib.error.HTTPError as e:    # 503 "unhealthy" still carries the JSON
        try:
            raw = e.read(4 << 20)
        finally:
            e.close()
    except Exception as e:  # refused, timeout, DNS, ...
        return None, "%s: %s" % (type(e).__name__, e)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return None, "bad JSON from /health: %s" % e
    if not isinstance(data, dict):
        return None, "unexpected /health payload"
    return data, None


def _workers(data: dict) -> list:
    workers = data.get("workers") or {}
    items = []
    if isinstance(workers, dict):
        for name, info in workers.items():
            info = dict(info) if isinstance(info, dict) else {"status": info}
            info.setdefault("name", name)
            items.append(info)
    elif isinstance(workers, list):
        items = [dict(w) for w in workers if isinstance(w, dict)]
    items.sort(key=lambda w: (str(w.get("route") or ""), str(w.get("name") or "")))
    return items


def _page(title: str, body: str) -> bytes:
    return ("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%s</title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<main class="wrap">
%s
</main>
</body>
</html>
""" % (_esc(title), body)).encode("utf-8")


def render_index(data, reason) -> bytes:
    out = ["""<header class="hero">
  <h1><span class="logo">TQ</span>Server</h1>
  <p class="blurb">%s</p>
</header>""" % _esc(BLURB)]
    if data is None:
        detail = ""
        if (os.environ.get("WORKER_MODE") or "development").startswith("dev") and reason:
            detail = ' <span class="detail">(%s)</span>' % _esc(reason)
        out.append('<section class="card"><h2>Workers</h2>'
                   '<p class="notice">status unavailable%s</p></section>' % detail)
    else:
        overall = data.get("status") or "unknown"
        rows = []
        for w in _workers(data):
            route = str(w.get("route") or "")
            status = w.get("status") or "unknown"
            total = w.get("instances")
            healthy = w.get("healthy_instances")
            if total is None:
                instances = "&ndash;"
            elif healthy is None:
                instances = _esc(total)
            else:
                instances = "%s / %s" % (_esc(healthy), _esc(total))
            error = w.get("error")
            link = ('<a href="%s">%s</a>' % (_esc(route), _esc(route))
                    if route.startswith("/") else _esc(route or "-"))
            rows.append(
                "<tr>"
                '<td class="name">%s</td><td class="route">%s</td><td>%s</td>'
                '<td class="num">%s</td>'
                '<td><span class="badge status-%s">%s</span>%s</td>'
                "</tr>" % (
                    _esc(w.get("name") or "?"), link, _esc(w.get("type") or "-"), instances,
                    _css_class(status), _esc(status),
                    '<div class="error">%s</div>' % _esc(error) if error else ""))
        if rows:
            table = ("<table class=\"workers\"><thead><tr><th>Worker</th><th>Route</th>"
                     "<th>Type</th><th>Instances</th><th>Status</th></tr></thead>"
                     "<tbody>%s</tbody></table>" % "".join(rows))
        else:
            table = '<p class="notice">No workers yet: add one under <code>workers/</code>.</p>'
        out.append('<section class="card"><h2>Workers <span class="badge status-%s">%s</span>'
                   "</h2>%s</section>" % (_css_class(overall), _esc(overall), table))
    info = worker_info()
    # The status page is on the control plane's own listener (admin.listen), never on
    # this public port: name the way there rather than link to a 404.
    out.append('<footer>Served by the <code>%s</code> worker (%s) &middot; '
               '<a href="/health">/health</a> &middot; status page and admin API: '
               '<code>.venv/bin/tqserver status</code>, or <code>admin.listen</code> '
               '(docs/operations.md)</footer>'
               % (_esc(info["name"] or "index"), _esc(info["type"] or "python")))
    return _page("TQServer", "\n".join(out))


def render_not_found(path: str) -> bytes:
    return _page("Not found \u2013 TQServer", """<header class="hero">
  <h1><span class="logo">TQ</span>Server</h1>
</header>
<section class="card">
  <h2>404 &ndash; not found</h2>
  <p>Nothing is served at <code>%s</code>.</p>
  <p><a href="/">Back to the start page</a></p>
</section>""" % _esc(path))


def app(environ, start_response):
    path = environ.get("PATH_INFO") or "/"
    method = environ.get("REQUEST_METHOD", "GET")
    headers = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache")]
    if path != "/":
        body = render_not_found(path.encode("latin-1").decode("utf-8", "replace"))
        start_response("404 Not Found", headers)
        return [body]
    if method not in ("GET", "HEAD"):
        start_response("405 Method Not Allowed",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")])
        return [b"405 method not allowed\n"]
    data, reason = fetch_status()
    body = render_index(data, reason)
    start_response("200 OK", headers)
    return [body]


if __name__ == "__main__":
    import _thread

    _thread.start_new_thread(_warm_up, ())
    serve(app)
