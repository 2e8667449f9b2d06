"""The pages TQServer itself answers with: errors (branded and detailed in dev, terse in
prod) and the build-error page that shows compiler output while a build is broken."""

from __future__ import annotations

import html
import json

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_STYLE = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
  background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px;font-weight:600;letter-spacing:.02em}
header span{color:#7fd1ae}
main{max-width:960px;margin:32px auto;padding:0 28px}
h1{font-size:26px;margin:0 0 8px}
.code{color:#c0392b}
p.detail{color:#46506a}
pre{background:#10141c;color:#e6e6e6;padding:16px;border-radius:6px;overflow:auto;font-size:13px;line-height:1.45}
footer{color:#8a93a6;font-size:12px;margin-top:32px}
"""


def error_page(
    status: int,
    detail: str = "",
    dev: bool = False,
    output: str | None = None,
    title: str | None = None,
) -> bytes:
    """HTML for an error response. Only dev mode shows ``detail`` and ``output``; production
    answers never reveal internal addresses or tracebacks."""
    reason = title or REASONS.get(status, "Error")
    if not dev:
        return (
            f"<!DOCTYPE html><html><head><title>{status} {reason}</title></head>"
            f"<body><h1>{status} {reason}</h1></body></html>\n"
        ).encode()
    body = [f"<h1><span class=code>{status}</span> {html.escape(reason)}</h1>"]
    if detail:
        body.append(f"<p class=detail>{html.escape(detail)}</p>")
    if output:
        body.append(f"<pre>{html.escape(output)}</pre>")
    body.append("<footer>TQServer &middot; development mode (production shows no details)</footer>")
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8>"
        f"<title>{status} {html.escape(reason)}</title><style>{_STYLE}</style></head>"
        "<body><header>TQ<span>Server</span></header><main>"
        + "".join(body)
        + "</main></body></html>\n"
    ).encode("utf-8")


def live_reload_snippet(worker: str, events_url: str, config_error: str | None = None) -> bytes:
    """The script added to dev-mode HTML pages; with ``config_error``, a banner above the
    page saying the worker's worker.yaml cannot be applied (it runs with the last good one)."""
    banner = ""
    if config_error:
        banner = (
            "<div id=tqserver-config-error style='position:fixed;top:0;left:0;right:0;"
            "z-index:2147483647;background:#b00020;color:#fff;padding:6px 12px;"
            "font:13px/1.4 ui-monospace,monospace;white-space:pre-wrap'>TQServer: "
            f"{html.escape(config_error)}\n(the worker runs with its last good "
            "configuration until this is fixed)</div>"
        )
    return (
        banner + "<script>/* TQServer live reload */(function(){if(!window.EventSource)return;"
        f"var w={json.dumps(worker)},s=new EventSource({json.dumps(events_url)});"
        "s.onmessage=function(m){var e;try{e=JSON.parse(m.data)}catch(x){return}"
        "if(e.worker===w||e.worker==='*'){s.close();location.reload()}}})();</script>\n"
    ).encode()
