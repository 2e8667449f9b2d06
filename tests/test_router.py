"""Routing snapshots: longest segment-aware prefix, fallback, duplicates, prefix stripping."""
from __future__ import annotations

from twisted.trial import unittest

from tqserver.proxy.router import RoutingTable, normalize_route, strip_prefix


class RoutingTableTests(unittest.TestCase):
    def setUp(self) -> None:
        self.table = RoutingTable([("/", "index"), ("/api", "api"),
                                   ("/api/v1/users", "users"), ("/hello", "hello")])

    def target(self, path: bytes):
        hit = self.table.match(path)
        return hit and hit[1]

    def test_exact_and_nested(self) -> None:
        self.assertEqual(self.target(b"/api"), "api")
        self.assertEqual(self.target(b"/api/"), "api")
        self.assertEqual(self.target(b"/api/x/y"), "api")
        self.assertEqual(self.target(b"/api/v1/users"), "users")
        self.assertEqual(self.target(b"/api/v1/users/42"), "users")
        self.assertEqual(self.target(b"/api/v1/other"), "api")

    def test_segment_aware(self) -> None:
        self.assertEqual(self.target(b"/apix"), "index")
        self.assertEqual(self.target(b"/hellox"), "index")
        self.assertEqual(self.target(b"/api/v1/usersx"), "api")

    def test_fallback_and_no_route(self) -> None:
        self.assertEqual(self.target(b"/"), "index")
        self.assertEqual(self.target(b"/nothing/here"), "index")
        self.assertIsNone(RoutingTable([("/api", "api")]).match(b"/other"))
        self.assertIsNone(RoutingTable([("/api", "api")]).match(b"/"))

    def test_match_returns_route(self) -> None:
        self.assertEqual(self.table.match(b"/api/v1/users/7"), ("/api/v1/users", "users"))

    def test_duplicate_rejected(self) -> None:
        with self.assertRaises(ValueError):
            RoutingTable([("/api", 1), ("/api/", 2)])

    def test_normalize(self) -> None:
        self.assertEqual(normalize_route("api/"), "/api")
        self.assertEqual(normalize_route(""), "/")
        self.assertEqual(normalize_route("/"), "/")


class StripPrefixTests(unittest.TestCase):
    def test_strip(self) -> None:
        self.assertEqual(strip_prefix("/api", b"/api/items"), b"/items")
        self.assertEqual(strip_prefix("/api", b"/api"), b"/")
        self.assertEqual(strip_prefix("/api", b"/api/"), b"/")
        self.assertEqual(strip_prefix("/", b"/x/y"), b"/x/y")
        self.assertEqual(strip_prefix("/a/b", b"/a/b/c"), b"/c")

    def test_non_ascii_route(self) -> None:
        # Found by tests.test_fuzz: '/café' was keyed by its UTF-8 bytes (which no valid
        # request target carries) and stripped by its length in characters.
        table = RoutingTable([("/café", "cafe"), ("/", "root")])
        self.assertEqual(table.match(b"/caf%C3%A9/menu"), ("/café", "cafe"))
        self.assertEqual(strip_prefix("/café", b"/caf%C3%A9/menu"), b"/menu")
