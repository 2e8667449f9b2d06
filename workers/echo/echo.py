"""Request echo: answers every request with a JSON description of it (what reached the
worker, after the proxy). Standard library only; run by TQServer as a `command` worker:

    python3 echo.py --port 9000        # listens on $WORKER_HOST (default 127.0.0.1)

GET /health answers 200 "ok". SIGTERM: stop accepting, finish the requests in flight, exit.
"""
import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_ECHOED_BODY = 64 * 1024
HEALTH_PATH = os.environ.get("WORKER_HEALTH_PATH", "/health")
BANNER = os.environ.get("ECHO_BANNER", "echo")


class Echo(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stopping never waits on an idle keep-alive.
    protocol_version = "HTTP/1.0"
    server_version = "tqserver-echo"

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = self.path.partition("?")
        if path == HEALTH_PATH:
            self.send("text/plain", b"ok")
            return
        description = {
            "banner": BANNER,
            "method": self.command,
            "path": path,
            "query": query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_bytes": len(body),
            "body": body[:MAX_ECHOED_BODY].decode("utf-8", "replace"),
            "pid": os.getpid(),
        }
        self.send("application/json", json.dumps(description, indent=2).encode() + b"\n")

    def send(self, content_type: str, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

    def log_message(self, format: str, *args) -> None:
        if self.path.partition("?")[0] == HEALTH_PATH:
            return      # the supervisor probes every few seconds: not worth a log line
        sys.stdout.write("%s %s\n" % (self.address_string(), format % args))
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    parser.add_argument("--host", default=os.environ.get("WORKER_HOST", "127.0.0.1"))
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Echo)
    server.daemon_threads = False        # server_close() waits for requests in flight
    # shutdown() blocks until serve_forever() returns, so call it from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{BANNER}: listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)   # how soon shutdown() is noticed
    except KeyboardInterrupt:
        pass
    server.server_close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
