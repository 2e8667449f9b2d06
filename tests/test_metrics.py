"""The scrape-time gauges of /metrics: every known worker has every series, whatever it
runs (a worker with no instance reads 0, so ``== 0`` alerts fire)."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.trial import unittest

from tqserver.control.metrics import Metrics
from tqserver.supervise.instance import InstanceState


def inst(state: InstanceState, inflight: int = 0):
    return SimpleNamespace(state=state, inflight=inflight, inflight_elsewhere=0,
                           health_failures=0)


class Pool:
    def __init__(self, name: str, instances=(), serving=(), status: str = "healthy") -> None:
        self.name = name
        self.instances = list(instances)
        self.serving = tuple(serving)
        self.status = status


class InstanceGaugeTests(unittest.TestCase):
    def scrape(self, pools) -> str:
        return Metrics().render(pools).decode()

    def test_a_worker_with_no_instance_reads_zero_in_every_state(self) -> None:
        text = self.scrape([Pool("hello", status="failed")])
        for state in InstanceState:
            self.assertIn(f'tqserver_worker_instances{{state="{state}",worker="hello"}} 0.0',
                          text)
        self.assertIn('tqserver_requests_in_flight{worker="hello"} 0.0', text)

    def test_states_counted_and_the_others_zero(self) -> None:
        a, b, c = inst(InstanceState.READY, 2), inst(InstanceState.READY, 1), inst(
            InstanceState.DRAINING)
        text = self.scrape([Pool("app", [a, b, c], [a, b])])
        self.assertIn('tqserver_worker_instances{state="ready",worker="app"} 2.0', text)
        self.assertIn('tqserver_worker_instances{state="draining",worker="app"} 1.0', text)
        self.assertIn('tqserver_worker_instances{state="starting",worker="app"} 0.0', text)
        self.assertIn('tqserver_worker_instances{state="exited",worker="app"} 0.0', text)
        self.assertIn('tqserver_requests_in_flight{worker="app"} 3.0', text)

    def test_a_removed_worker_has_no_series_left(self) -> None:
        metrics = Metrics()
        metrics.render([Pool("gone", [inst(InstanceState.READY)])])
        text = metrics.render([Pool("app")]).decode()
        self.assertNotIn('worker="gone"', text)
        self.assertIn('tqserver_worker_instances{state="ready",worker="app"} 0.0', text)

    def test_worker_healthy_gauge(self) -> None:
        ok = inst(InstanceState.READY)
        text = self.scrape([Pool("good", [ok], [ok]), Pool("broken", status="failed")])
        self.assertIn('tqserver_worker_healthy{worker="good"} 1.0', text)
        self.assertIn('tqserver_worker_healthy{worker="broken"} 0.0', text)
