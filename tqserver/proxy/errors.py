"""Error responses: the page for a status, written once a request can take it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from tqserver.proxy import pages

if TYPE_CHECKING:
    from tqserver.proxy.site import ProxyRequest


def error_renderer(
    status: int,
    detail: str = "",
    output: str | None = None,
    title: str | None = None,
    retry_after: int | None = None,
    live_reload: str | None = None,
) -> Callable:
    def render(request: ProxyRequest) -> None:
        send_error(
            request,
            status,
            detail,
            output=output,
            title=title,
            retry_after=retry_after,
            live_reload=live_reload,
        )

    return render


def send_error(
    request: ProxyRequest,
    status: int,
    detail: str = "",
    output: str | None = None,
    title: str | None = None,
    retry_after: int | None = None,
    live_reload: str | None = None,
) -> None:
    """An error page; in dev, ``live_reload`` names the worker whose next swap reloads it."""
    if request.finished or request.disconnected:
        return
    if request.startedWriting:
        # Too late for a status: cut the response so the client sees it is incomplete.
        request.channel.transport.abortConnection()
        return
    front = request.front
    body = pages.error_page(status, detail, dev=front.dev, output=output, title=title)
    if front.dev and live_reload:
        body += front.live_reload_snippet(live_reload)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request.request_id])
    if retry_after is not None:
        request.responseHeaders.setRawHeaders(b"retry-after", [str(retry_after).encode()])
    if request.method != b"HEAD":
        request.write(body)
    request.finish_when_read()
