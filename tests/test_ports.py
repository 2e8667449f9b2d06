"""PortPool: range, skipping ports bound by anyone, release, exhaustion."""
from __future__ import annotations

from twisted.trial import unittest

from tqserver.supervise.ports import PortPool, PortsExhausted, port_is_free

from .support import listening_port


class PortPoolTests(unittest.TestCase):
    def test_round_robin_and_release(self) -> None:
        pool = PortPool(9000, 9002, is_free=lambda p: True)
        self.assertEqual([pool.acquire() for _ in range(3)], [9000, 9001, 9002])
        with self.assertRaises(PortsExhausted) as ctx:
            pool.acquire()
        self.assertIn("9000-9002", str(ctx.exception))
        pool.release(9001)
        self.assertEqual(pool.acquire(), 9001)

    def test_skips_ports_taken_by_others(self) -> None:
        taken = {9000, 9002}
        pool = PortPool(9000, 9003, is_free=lambda p: p not in taken)
        self.assertEqual(pool.acquire(), 9001)
        self.assertEqual(pool.acquire(), 9003)
        self.assertRaises(PortsExhausted, pool.acquire)

    def test_released_port_not_reused_immediately(self) -> None:
        pool = PortPool(9000, 9009, is_free=lambda p: True)
        first = pool.acquire()
        pool.release(first)
        self.assertNotEqual(pool.acquire(), first)

    def test_reconfigure(self) -> None:
        pool = PortPool(9000, 9001, is_free=lambda p: True)
        pool.reconfigure(9100, 9100)
        self.assertEqual(pool.acquire(), 9100)
        self.assertRaises(ValueError, pool.reconfigure, 10, 5)

    def test_real_bound_port_is_not_free(self) -> None:
        port = listening_port(self)
        self.assertFalse(port_is_free(port))
        pool = PortPool(port, port)
        self.assertRaises(PortsExhausted, pool.acquire)
