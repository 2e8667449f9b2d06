"""Tests for tqserver.discovery: which directories are workers, routes, types."""
from __future__ import annotations

import os
import textwrap

from twisted.trial import unittest

from tqserver.config.discovery import discover, infer_type
from tqserver.config.worker import WorkerConfig


class DiscoveryTests(unittest.TestCase):

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def file(self, relpath: str, text: str = "") -> str:
        path = os.path.join(self.root, *relpath.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def found(self, mode: str = "dev", **kwargs):
        result = discover(self.root, mode, **kwargs)
        return {w.name: (w.route, w.type) for w in result.workers}, result

    def test_flat_workers_and_default_routes(self):
        self.file("index/src/main.go", "package main\n")
        self.file("api/go.mod", "module api\n")
        self.file("blog/public/index.php", "<?php\n")
        workers, result = self.found()
        self.assertEqual(workers, {"index": ("/", "go"), "api": ("/api", "go"),
                                   "blog": ("/blog", "php")})
        self.assertEqual([w.name for w in result.workers], ["api", "blog", "index"])
        self.assertEqual(result.errors, ())
        api = result.workers[0]
        self.assertEqual(api.directory, os.path.join(self.root, "api"))
        self.assertIsNone(api.config_file)
        self.assertEqual(api.config, WorkerConfig())

    def test_nested_workers(self):
        self.file("api/v1/users/src/main.py")
        self.file("api/v1/orders/index.ts")
        self.file("api/src/main.go")
        workers, _ = self.found()
        self.assertEqual(workers, {"api": ("/api", "go"),
                                   "api/v1/users": ("/api/v1/users", "python"),
                                   "api/v1/orders": ("/api/v1/orders", "bun")})

    def test_only_top_level_index_is_root(self):
        self.file("docs/index/src/main.py")
        workers, _ = self.found()
        self.assertEqual(workers, {"docs/index": ("/docs/index", "python")})

    def test_path_override_and_config_file(self):
        yaml = self.file("users/config/worker.yaml", "path: /people/\n")
        self.file("users/src/main.py")
        _, result = self.found()
        [spec] = result.workers
        self.assertEqual((spec.route, spec.config_file, spec.config.path),
                         ("/people", yaml, "/people/"))

    def test_type_inference_per_runtime(self):
        cases = {
            "g1": ["go.mod"], "g2": ["src/main.go"],
            "k1": ["src/Main.kt"], "k2": ["build.gradle"], "k3": ["build.gradle.kts"],
            "k4": ["pom.xml"],
            "b1": ["index.ts"], "b2": ["package.json"],
            "p1": ["src/main.py"],
            "h1": ["public/index.php"], "h2": ["public/info.php"],
        }
        for name, files in cases.items():
            for f in files:
                self.file(f"{name}/{f}")
        workers, _ = self.found()
        expected = {"g": "go", "k": "kotlin", "b": "bun", "p": "python", "h": "php"}
        self.assertEqual({n: t for n, (_, t) in workers.items()},
                         {n: expected[n[0]] for n in cases})

    def test_inference_order(self):
        d = os.path.join(self.root, "w")
        self.file("w/public/index.php")
        self.assertEqual(infer_type(d, WorkerConfig()), "php")
        self.file("w/src/main.py")
        self.assertEqual(infer_type(d, WorkerConfig()), "python")
        self.file("w/package.json", "{}")
        self.assertEqual(infer_type(d, WorkerConfig()), "bun")
        self.file("w/pom.xml")
        self.assertEqual(infer_type(d, WorkerConfig()), "kotlin")
        self.file("w/go.mod")
        self.assertEqual(infer_type(d, WorkerConfig()), "go")
        self.assertEqual(infer_type(d, WorkerConfig(command=("x",))), "command")

    def test_configured_entrypoints(self):
        self.file("py/config/worker.yaml", "python: {entrypoint: app.py}\n")
        self.file("py/app.py")
        self.file("js/config/worker.yaml", "bun: {entrypoint: server.js}\n")
        self.file("js/server.js")
        workers, _ = self.found()
        self.assertEqual(workers, {"py": ("/py", "python"), "js": ("/js", "bun")})

    def test_command_and_explicit_type(self):
        self.file("cmd/config/worker.yaml", "command: [./run, '{port}']\n")
        self.file("static/config/worker.yaml", "type: python\n")
        workers, _ = self.found()
        self.assertEqual(workers, {"cmd": ("/cmd", "command"),
                                   "static": ("/static", "python")})

    def test_config_without_inferable_type_is_error(self):
        yaml = self.file("mystery/config/worker.yaml", "path: /m\n")
        self.file("good/go.mod")
        workers, result = self.found()
        self.assertEqual(workers, {"good": ("/good", "go")})
        [err] = result.errors
        self.assertEqual((err.file, err.key), (yaml, "type"))
        self.assertIn("go.mod", err.message)
        self.assertIn("src/main.py", err.message)

    def test_plain_directories_are_not_workers(self):
        self.file("notes/readme.txt")
        self.file("group/empty/readme.md")
        workers, result = self.found()
        self.assertEqual((workers, result.errors, result.disabled), ({}, (), ()))

    def test_duplicate_route_names_both(self):
        self.file("api/go.mod")
        yaml = self.file("zapi/config/worker.yaml", "type: go\npath: /api\n")
        self.file("zapi/go.mod")
        workers, result = self.found()
        self.assertEqual(workers, {"api": ("/api", "go")})
        [err] = result.errors
        self.assertEqual((err.file, err.line, err.column, err.key), (yaml, 2, 7, "path"))
        self.assertIn("'api'", err.message)
        self.assertIn("'zapi'", err.message)
        self.assertIn("route '/api'", err.message)

    def test_invalid_config_reported_others_discovered(self):
        yaml = self.file("broken/config/worker.yaml", "path: /b\nscaling: {max_workers: x}\n")
        self.file("broken/go.mod")
        self.file("nested/src/main.py")
        self.file("fine/index.ts")
        workers, result = self.found()
        self.assertEqual(workers, {"nested": ("/nested", "python"), "fine": ("/fine", "bun")})
        [err] = result.errors
        self.assertEqual((err.file, err.line, err.column, err.key),
                         (yaml, 2, 24, "scaling.max_workers"))

    def test_config_warnings_collected(self):
        self.file("blog/config/worker.yaml", "document_root: public\n")
        self.file("blog/public/index.php")
        _, result = self.found()
        self.assertEqual([w.key for w in result.warnings], ["document_root"])
        self.assertEqual(len(result.workers), 1)

    def test_reserved_subdirs_not_workers(self):
        self.file("app/go.mod")
        for sub in ("src", "bin", "public", "views", "config", "data", "node_modules",
                    "logs", "vendor"):
            self.file(f"app/{sub}/inner/package.json", "{}")
            self.file(f"app/{sub}/inner/src/main.py")
        self.file("app/node_modules/leftpad/index.ts")
        workers, _ = self.found()
        self.assertEqual(workers, {"app": ("/app", "go")})

    def test_hidden_and_ignored_dirs_skipped(self):
        self.file(".git/hooks/index.ts")
        self.file("tmp/src/main.py")
        self.file("keep/src/main.py")
        workers, _ = self.found(ignore=["tmp*", "*.swp"])
        self.assertEqual(workers, {"keep": ("/keep", "python")})

    def test_enabled_per_mode(self):
        self.file("devtool/config/worker.yaml", "enabled: development\n")
        self.file("devtool/src/main.py")
        self.file("live/config/worker.yaml", "enabled: production\n")
        self.file("live/src/main.py")
        self.file("off/config/worker.yaml", "enabled: false\n")
        dev, dev_result = self.found("dev")
        prod, prod_result = self.found("prod")
        self.assertEqual(sorted(dev), ["devtool"])
        self.assertEqual(dev_result.disabled, ("live", "off"))
        self.assertEqual(sorted(prod), ["live"])
        self.assertEqual(prod_result.disabled, ("devtool", "off"))

    def test_disabled_worker_does_not_claim_route(self):
        self.file("a/config/worker.yaml", "enabled: false\npath: /x\n")
        self.file("a/go.mod")
        self.file("b/config/worker.yaml", "path: /x\n")
        self.file("b/go.mod")
        workers, result = self.found()
        self.assertEqual((workers, result.errors), ({"b": ("/x", "go")}, ()))

    def test_missing_workers_dir(self):
        result = discover(os.path.join(self.root, "nope"), "dev")
        self.assertEqual((result.workers, result.errors), ((), ()))
        self.assertEqual([w.message for w in result.warnings],
                         ["workers directory not found"])
