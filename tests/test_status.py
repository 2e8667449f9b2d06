"""The live status: request windows measured from the proxy's counts (on a task.Clock),
process figures, the output tail, the status stream and the page."""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from tqserver.control import status_page
from tqserver.control.metrics import LATENCY_BUCKETS, RequestStats
from tqserver.control.processes import ProcessStats
from tqserver.control.stream import PUSH_SECONDS, StatusStream
from tqserver.control.windows import Delta, RequestWindows, quantile
from tqserver.logs.tail import LogTail
from tqserver.supervise.events import PoolEvent


class WindowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = RequestStats()
        self.elsewhere = RequestStats()  # a proxy process's report
        self.windows = RequestWindows(self.clock, lambda: [self.stats, self.elsewhere])
        self.windows.startService()
        self.addCleanup(self.windows.stopService)

    def serve(self, n: int, worker: str = "app", code: int = 200, seconds: float = 0.003):
        for _ in range(n):
            self.stats.observe_request(worker, code, seconds)

    def test_rate_errors_and_latency_over_the_last_minute(self) -> None:
        for _ in range(30):
            self.serve(9)  # 0.003 s: in the (0.0025, 0.005] bucket
            self.serve(1, code=502, seconds=0.2)
            self.clock.advance(1)
        w = self.windows.window()["app"]
        self.assertEqual((w["requests"], w["errors"]), (300, 30))
        self.assertEqual(w["rate"], 10.0)  # 300 in the 30 s it has run
        self.assertEqual(w["error_rate"], 0.1)
        self.assertTrue(2.5 <= w["p50_ms"] <= 5, w)
        self.assertTrue(100 <= w["p99_ms"] <= 250, w)

    def test_what_is_older_than_the_window_falls_out(self) -> None:
        self.serve(100, seconds=0.2)
        self.clock.advance(1)
        for _ in range(70):
            self.serve(2)
            self.clock.advance(1)
        w = self.windows.window()["app"]
        self.assertEqual(w["requests"], 120)  # the last 60 s only
        self.assertEqual(w["rate"], 2.0)
        self.assertLess(w["p99_ms"], 5)  # the slow burst is gone
        self.assertEqual(self.windows.window(600)["app"]["requests"], 240)

    def test_counts_from_other_processes(self) -> None:
        self.elsewhere.observe_request("app", 200, 0.001)
        self.serve(1)
        self.clock.advance(1)
        self.assertEqual(self.windows.window()["app"]["requests"], 2)

    def test_a_worker_without_requests_is_absent(self) -> None:
        self.serve(1, worker="a")
        for _ in range(61):
            self.clock.advance(1)
        self.assertEqual(self.windows.window(), {})

    def test_history_points(self) -> None:
        for second in range(30):
            if second < 10:
                self.serve(5, seconds=0.02)
            self.clock.advance(1)
        series = self.windows.history(seconds=60, step=10)["app"]
        self.assertEqual(len(series), 6)
        rates = [p[0] for p in series]
        self.assertEqual(sum(rates) * 10, 50)
        self.assertEqual(rates[-1], 0.0)
        busy = [p for p in series if p[0]]
        self.assertTrue(all(10 <= p[1] <= 25 and 10 <= p[2] <= 25 for p in busy), series)
        self.assertTrue(all(p[1] is None for p in series if not p[0]))

    def test_stops_sampling_when_stopped(self) -> None:
        self.windows.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class QuantileTests(unittest.TestCase):
    def row(self, *pairs):
        delta = Delta()
        for bucket, n in pairs:
            delta.row[bucket] += n
        return delta.row

    def test_empty(self) -> None:
        self.assertIsNone(quantile(0.5, self.row()))

    def test_interpolates_inside_the_bucket(self) -> None:
        # 10 durations in (0.005, 0.01]: the median is halfway through that bucket
        self.assertAlmostEqual(quantile(0.5, self.row((4, 10))), 0.0075)

    def test_beyond_the_last_bound(self) -> None:
        top = len(LATENCY_BUCKETS)
        self.assertEqual(quantile(0.99, self.row((0, 1), (top, 99))), LATENCY_BUCKETS[-1])


class ProcessStatsTests(unittest.TestCase):
    def test_own_process(self) -> None:
        stats = ProcessStats()
        first = stats.measure(os.getpid())
        self.assertIsNone(first["cpu_percent"])  # nothing to compare with yet
        self.assertGreater(first["rss_bytes"], 1 << 20)
        sum(i * i for i in range(200000))
        second = stats.measure(os.getpid())
        self.assertIsInstance(second["cpu_percent"], float)
        self.assertGreaterEqual(second["cpu_percent"], 0.0)

    def test_gone_or_unknown(self) -> None:
        stats = ProcessStats()
        self.assertEqual(stats.measure(None), {"cpu_percent": None, "rss_bytes": None})
        self.assertEqual(stats.measure(2**22 + 12345)["rss_bytes"], None)


class LogTailTests(unittest.TestCase):
    def test_keeps_the_last_lines_and_tells_followers(self) -> None:
        tail = LogTail(size=3)
        seen: list = []
        stop = tail.follow(seen.append)
        tail.feed(b"one\ntwo\n")
        tail.feed(b"three\nfour\n")
        self.assertEqual(tail.last(10), ["two", "three", "four"])
        self.assertEqual(tail.last(1), ["four"])
        self.assertEqual(seen, [["one", "two"], ["three", "four"]])
        stop()
        tail.feed(b"five\n")
        self.assertEqual(len(seen), 2)


class FakeLive:
    def __init__(self) -> None:
        self.snapshots = 0

    def snapshot(self) -> dict:
        self.snapshots += 1
        return {"n": self.snapshots}


class FakePool:
    name = "app"


def stream_request() -> DummyRequest:
    request = DummyRequest([b"api", b"stream"])
    request.disconnected = False
    return request


def events_in(request) -> list:
    text = b"".join(request.written).decode()
    return [
        (block.split("\n")[0][len("event: ") :], json.loads(block.split("data: ", 1)[1]))
        for block in text.split("\n\n")
        if block.startswith("event: ")
    ]


class StatusStreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.live = FakeLive()
        self.stream = StatusStream(self.clock, self.live)
        self.stream.startService()

    def test_a_snapshot_at_once_then_every_second_until_the_client_leaves(self) -> None:
        request = stream_request()
        self.stream.subscribe(request)
        self.assertEqual(events_in(request), [("status", {"n": 1})])
        self.clock.advance(PUSH_SECONDS)
        self.clock.advance(PUSH_SECONDS)
        self.assertEqual([e[1]["n"] for e in events_in(request)], [1, 2, 3])
        request.processingFailed(Exception("gone"))  # the client went away
        self.clock.advance(PUSH_SECONDS)
        self.clock.advance(PUSH_SECONDS)
        self.assertEqual(self.live.snapshots, 3)
        self.stream.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pool_events_push_soon_and_coalesce(self) -> None:
        request = stream_request()
        self.stream.subscribe(request)
        self.stream.pool_changed(FakePool(), PoolEvent.SWAP)
        self.stream.pool_changed(FakePool(), PoolEvent.SERVING)
        self.stream.pool_changed(FakePool(), PoolEvent.PROBE_OK)  # not worth a push
        self.clock.advance(0.1)
        kinds = [e[0] for e in events_in(request)]
        self.assertEqual(kinds, ["status", "pool", "pool", "status"])
        self.stream.stopService()
        self.assertEqual(request.finished, 1)  # stopping ends the stream


class PageTests(unittest.TestCase):
    def test_self_contained_with_its_first_snapshot(self) -> None:
        page = status_page.render("/_tqserver", {"workers": {"x": "</script><b>"}}).decode()
        self.assertNotIn("</script><b>", page)  # the JSON cannot end the script early
        self.assertIn('data-base="/_tqserver"', page)
        self.assertNotIn("http://", page.replace("http://www.w3.org/2000/svg", ""))
        self.assertNotIn("src=", page)
