"""Waiting until a node serves a release: its /health says the release on disk is the new
one (``revision``) and every worker concerned serves code from it and is not deploying.
A worker that stopped deploying without taking the revision failed its build or start: that
is an answer at once, with the worker's error, not a timeout."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable


class NotServing(Exception):
    """The release does not serve; the message says which worker and why."""


def fetch_health(url: str, timeout: float = 3.0) -> dict:
    """/health's JSON (a 503 has it too), or raise OSError / ValueError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def verdict(health: dict, revision: str, workers: list[str]) -> tuple[bool, str | None]:
    """(serving, failure): serving when the release and every worker concerned are on
    ``revision``; a failure message when a worker gave up on it."""
    if health.get("revision") != revision:
        return False, None
    found = health.get("workers") or {}
    failed = []
    waiting = False
    for name in workers or sorted(found):
        w = found.get(name)
        if w is None:
            waiting = True  # a new worker is not started yet
            continue
        if w.get("revision") == revision and not w.get("deploying"):
            continue
        if w.get("deploying"):
            waiting = True
            continue
        why = w.get("error") or w.get("config_error") or f"status {w.get('status')}"
        failed.append(f"{name}: {why}")
    if failed:
        return False, "; ".join(failed)
    return not waiting, None


def wait_until_serving(
    url: str,
    revision: str,
    workers: list[str],
    timeout: float,
    interval: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll ``url`` until ``revision`` serves; the seconds it took. Raises NotServing."""
    started = clock()
    last = "no answer yet"
    while True:
        try:
            serving, failure = verdict(fetch_health(url), revision, workers)
        except (OSError, ValueError) as e:
            serving, failure, last = False, None, f"{url}: {e}"
        else:
            last = f"{url} does not report revision {revision} everywhere yet"
        if failure:
            raise NotServing(failure)
        if serving:
            return clock() - started
        if clock() - started > timeout:
            raise NotServing(f"not serving after {timeout:g}s ({last})")
        sleep(interval)
