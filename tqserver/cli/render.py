"""A status snapshot as text: the table of ``tqserver status`` (one row per worker, like
``pm2 list``) and the frames of ``tqserver top``."""

from __future__ import annotations

import time

COLUMNS = (
    "worker",
    "type",
    "status",
    "inst",
    "pid",
    "uptime",
    "req/s",
    "err%",
    "p50",
    "p99",
    "cpu",
    "mem",
    "restarts",
    "build",
)

_COLORS = {"healthy": "32", "starting": "33", "degraded": "33", "failed": "31", "stopped": "31"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def millis(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}ms" if v < 100 else f"{v:.0f}ms"


def row(name: str, w: dict) -> list[str]:
    serving = [i for i in w["instances"] if i["serving"]]
    shown = serving or w["instances"]
    cpus = [i["cpu_percent"] for i in shown if i["cpu_percent"] is not None]
    rss = [i["rss_bytes"] for i in shown if i["rss_bytes"] is not None]
    uptimes = [i["uptime_seconds"] for i in serving if i["uptime_seconds"] is not None]
    r = w["requests"]
    build = w["last_build"]
    status = w["status"] + (" (crash loop)" if w["crash_loop"] else "")
    status += " (deploying)" if w["deploying"] and w["status"] != "starting" else ""
    return [
        name,
        w["type"],
        status,
        str(len(serving)),
        ",".join(str(i["pid"]) for i in shown) or "-",
        duration(min(uptimes) if uptimes else None),
        f"{r['rate']:.1f}",
        f"{r['error_rate'] * 100:.1f}",
        millis(r["p50_ms"]),
        millis(r["p99_ms"]),
        f"{sum(cpus):.1f}%" if cpus else "-",
        size(sum(rss)) if rss else "-",
        str(sum(w["restarts"].values())),
        "-"
        if build is None
        else ("cancelled" if build["cancelled"] else "ok" if build["ok"] else "FAILED")
        + f" {build['duration_seconds']:.1f}s",
    ]


def table(snapshot: dict, color: bool = False) -> str:
    rows = [list(COLUMNS)] + [row(n, w) for n, w in snapshot["workers"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for k, cells in enumerate(rows):
        out = []
        for i, cell in enumerate(cells):
            text = cell.ljust(widths[i])
            if color and k and COLUMNS[i] == "status":
                code = _COLORS.get(cell.split(" ")[0])
                text = f"\x1b[{code}m{text}\x1b[0m" if code else text
            elif color and k == 0:
                text = f"\x1b[1m{text}\x1b[0m"
            out.append(text)
        lines.append("  ".join(out).rstrip())
    if not snapshot["workers"]:
        lines.append("(no workers)")
    ready = snapshot.get("ready")  # (a server from before readiness has none)
    if ready is not None and ready["status"] != "ready":
        waiting = ready["waiting_for"]
        lines.append(
            f"not ready: {ready['status']}"
            + (f" (waiting for {', '.join(waiting)})" if waiting else "")
        )
    for error in snapshot["config_errors"]:
        lines.append(f"configuration error: {error}")
    for name, w in snapshot["workers"].items():
        if w["error"]:
            lines.append(f"{name}: {w['error']}")
    return "\n".join(lines)


def top_frame(snapshot: dict, color: bool) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(snapshot["time"]))
    head = (
        f"tqserver top - {snapshot['root']} ({snapshot['mode']}) - {when}"
        " - last minute's rates - Ctrl-C quits"
    )
    return head + "\n\n" + table(snapshot, color)
