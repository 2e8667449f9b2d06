"""Tests for tqserver.config: defaults, errors with positions, warnings, aliases."""
from __future__ import annotations

import os
import textwrap

import attrs
from twisted.trial import unittest

from tqserver.config.errors import ConfigError, ConfigWarning
from tqserver.config.fields import parse_size
from tqserver.config.server import ServerConfig, default_server_config, load_server_config
from tqserver.config.worker import GoConfig, WorkerConfig, default_worker_config, load_worker_config


class _FileMixin:
    def write(self, text: str, name: str = "config.yaml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def assertError(self, loader, text, line, column, key, contains=""):
        """The loader raises a ConfigError at exactly this place."""
        path = self.write(text)
        err = self.assertRaises(ConfigError, loader, path)
        self.assertEqual((err.file, err.line, err.column, err.key),
                         (path, line, column, key), str(err))
        self.assertIn(contains, err.message)
        self.assertTrue(str(err).startswith(f"{path}:{line}:{column}: {key}: "), str(err))
        return err


class ServerDefaultsTests(unittest.TestCase):
    """The defaults are those the README lists for server.yaml, key for key."""

    def test_server(self):
        s = default_server_config().server
        self.assertEqual(
            (s.port, s.host, s.read_timeout_seconds, s.write_timeout_seconds,
             s.idle_timeout_seconds, s.log_file, s.access_log, s.max_body_bytes,
             s.trusted_proxies, s.proxy_processes, s.shutdown_delay_seconds),
            (8080, "0.0.0.0", 30, 30, 120, "logs/tqserver_{date}.log", True,
             104857600, (), 1, 0))

    def test_workers(self):
        w = default_server_config().workers
        self.assertEqual(attrs.asdict(w), {
            "directory": "workers", "port_range_start": 9000, "port_range_end": 9999,
            "startup_delay_ms": 100, "startup_timeout_ms": 10000, "restart_delay_ms": 100,
            "shutdown_grace_period_ms": 500, "kill_timeout_ms": 5000,
            "health_check_interval_ms": 10000, "health_check_timeout_ms": 1000,
            "health_check_failures": 3, "restart_backoff_min_ms": 100,
            "restart_backoff_max_ms": 30000, "cgroups": True})

    def test_other_sections(self):
        c = default_server_config()
        self.assertEqual(c.file_watcher.debounce_ms, 50)
        self.assertEqual(c.file_watcher.ignore, (
            ".git", "node_modules", "bin", "*.swp", "*~", ".#*", "__pycache__"))
        self.assertEqual((c.metrics.enabled, c.metrics.path, c.metrics.public),
                         (True, "/metrics", False))
        self.assertEqual(c.health.path, "/health")
        self.assertEqual((c.admin.path, c.admin.token), ("/_tqserver", ""))
        self.assertIn("*~", c.static.deny)
        self.assertIn("*.bak", c.static.deny)
        self.assertEqual(c.source, "")


class ShippedServerYamlTests(unittest.TestCase):
    def test_it_loads_cleanly_and_says_only_the_defaults(self):
        """etc/server.yaml shows the main keys as a starting point: each with its default,
        so it cannot drift from the README's table."""
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "server.yaml")
        config, warnings = load_server_config(path)
        self.assertEqual(warnings, [])
        self.assertEqual(attrs.evolve(config, source=""), default_server_config())


class WorkerDefaultsTests(unittest.TestCase):
    """The defaults are those the README lists for worker.yaml."""

    def test_top_level(self):
        c = default_worker_config()
        self.assertEqual(
            (c.path, c.type, c.enabled, c.strip_prefix, c.working_directory,
             c.health_path, c.env, c.max_requests, c.memory_limit, c.command,
             c.log_file, c.source),
            (None, None, True, True, "worker", "/health", {}, 0, 0, (),
             "logs/worker_{name}_{date}.log", ""))

    def test_sections(self):
        c = default_worker_config()
        self.assertEqual(c.go, GoConfig(2, "", 0, ()))
        self.assertEqual(c.python.entrypoint, "src/main.py")
        self.assertEqual((c.bun.entrypoint, c.bun.env), ("index.ts", {}))
        self.assertEqual((c.kotlin.main_class, c.kotlin.jvm_args), ("", ()))
        self.assertEqual((c.php.binary, c.php.config_file, c.php.settings), ("", "", {}))
        self.assertEqual(attrs.asdict(c.php.pool), {
            "manager": "dynamic", "min_workers": 1, "max_workers": 5, "start_workers": 2,
            "max_requests": 0, "request_timeout": 30, "idle_timeout": 10,
            "listen_address": "127.0.0.1"})
        self.assertEqual(attrs.asdict(c.scaling), {
            "min_workers": 1, "max_workers": 1, "queue_threshold": 10,
            "scale_down_delay": 60})
        self.assertEqual(attrs.asdict(c.timeouts), {
            "read_timeout_seconds": 30, "write_timeout_seconds": 30,
            "idle_timeout_seconds": 120})

    def test_mutable_defaults_not_shared(self):
        self.assertIsNot(default_worker_config().env, default_worker_config().env)


class LoadServerTests(_FileMixin, unittest.TestCase):

    def test_empty_file_is_defaults(self):
        path = self.write("# nothing here\n")
        config, warnings = load_server_config(path)
        self.assertEqual(config, attrs.evolve(default_server_config(), source=path))
        self.assertEqual(config.source, path)
        self.assertEqual(warnings, [])

    def test_values(self):
        config, warnings = load_server_config(self.write("""\
            server:
              port: 8081
              read_timeout_seconds: 2.5
              idle_timeout_seconds: 5
              log_file: ~
              max_body_bytes: 10MiB
              trusted_proxies: ["10.0.0.1"]
              proxy_processes: auto
            workers: {port_range_start: 10000, port_range_end: 10010}
            metrics: {public: true}
            admin: {token: s3cret}
            static: {deny: ["*.log", "*.sql"]}
            """))
        self.assertEqual(warnings, [])
        self.assertEqual(config.static.deny, ("*.log", "*.sql"))
        s = config.server
        self.assertEqual((s.port, s.read_timeout_seconds, s.idle_timeout_seconds),
                         (8081, 2.5, 5.0))
        self.assertIsInstance(s.idle_timeout_seconds, float)
        self.assertIsNone(s.log_file)
        self.assertEqual(s.max_body_bytes, 10 * 1024 * 1024)
        self.assertEqual(s.trusted_proxies, ("10.0.0.1",))
        self.assertEqual(s.proxy_processes, "auto")
        self.assertEqual((config.workers.port_range_start, config.workers.port_range_end),
                         (10000, 10010))
        self.assertTrue(config.metrics.public)
        self.assertEqual(config.admin.token, "s3cret")

    def test_log_file_disabled_spellings(self):
        for spelling in ('""', '"~"', "null", "~", ""):
            config, _ = load_server_config(self.write(f"server:\n  log_file: {spelling}\n"))
            self.assertIsNone(config.server.log_file, spelling)

    def test_type_error(self):
        err = self.assertError(load_server_config, """\
            server:
              host: "::"
              port: "abc"
            """, 3, 9, "server.port", "expected an integer")
        self.assertIn("'abc'", err.message)

    def test_float_for_int(self):
        self.assertError(load_server_config, "workers:\n  kill_timeout_ms: 1.5\n",
                         2, 20, "workers.kill_timeout_ms", "expected an integer")

    def test_string_bool_rejected(self):
        self.assertError(load_server_config, "server:\n  access_log: yes\n",
                         2, 15, "server.access_log", "expected true or false")

    def test_list_where_map_expected(self):
        self.assertError(load_server_config, "metrics:\n  - enabled\n",
                         2, 3, "metrics", "expected a mapping")

    def test_port_out_of_range(self):
        self.assertError(load_server_config, "server: {port: 70000}\n",
                         1, 16, "server.port", "between 1 and 65535")

    def test_negative_timeout(self):
        self.assertError(load_server_config, "server:\n  write_timeout_seconds: -1\n",
                         2, 26, "server.write_timeout_seconds", ">= 0")

    def test_port_range_order(self):
        self.assertError(load_server_config, """\
            workers:
              port_range_start: 9500
              port_range_end: 9400
            """, 2, 21, "workers.port_range_start", "port_range_end")

    def test_metrics_path_must_be_absolute(self):
        self.assertError(load_server_config, "metrics:\n  path: metrics\n",
                         2, 9, "metrics.path", "must start with '/'")

    def test_bad_list_item(self):
        self.assertError(load_server_config, "file_watcher:\n  ignore: [a, {b: 1}]\n",
                         2, 15, "file_watcher.ignore[1]", "expected a string")

    def test_proxy_processes(self):
        self.assertError(load_server_config, "server:\n  proxy_processes: 0\n",
                         2, 20, "server.proxy_processes", ">= 1")

    def test_yaml_syntax_error(self):
        path = self.write("server:\n  port: [8080\nworkers: {}\n")
        err = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((err.file, err.line, err.column, err.key), (path, 3, 8, None))
        self.assertTrue(str(err).startswith(f"{path}:3:8: "), str(err))

    def test_duplicate_key(self):
        path = self.write("server:\n  port: 1\n  port: 2\n")
        err = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((err.line, err.column), (3, 3))
        self.assertIn("duplicate", err.message)

    def test_top_level_not_a_mapping(self):
        path = self.write("# a list\n- server\n- workers\n")
        err = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((err.file, err.line, err.column, err.key), (path, 2, 1, None))
        self.assertIn("mapping", err.message)

    def test_top_level_scalar(self):
        path = self.write("\n\nhello\n")
        err = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((err.line, err.column), (3, 1))

    def test_missing_file(self):
        path = os.path.join(self.mktemp(), "server.yaml")
        err = self.assertRaises(ConfigError, load_server_config, path)
        self.assertEqual((err.file, err.line, err.column, err.key, err.message),
                         (path, None, None, None, "file not found"))
        self.assertEqual(str(err), f"{path}: file not found")

    def test_unknown_key_suggestion(self):
        path = self.write("server:\n  prot: 8081\n")
        config, warnings = load_server_config(path)
        self.assertEqual(config.server.port, 8080)
        self.assertEqual(warnings, [ConfigWarning(
            path, 2, 3, "server.prot", "unknown key 'prot'; did you mean 'port'?")])
        self.assertEqual(str(warnings[0]),
                         f"{path}:2:3: server.prot: unknown key 'prot'; did you mean 'port'?")

    def test_misplaced_key_suggestion(self):
        _, warnings = load_server_config(self.write("port: 8081\n"))
        self.assertEqual([w.message for w in warnings],
                         ["unknown key 'port'; did you mean 'server.port'?"])

    def test_unknown_key_without_suggestion(self):
        _, warnings = load_server_config(self.write("sessions: {store: redis}\n"))
        self.assertEqual([(w.key, w.message) for w in warnings],
                         [("sessions", "unknown key 'sessions'")])

    def test_positions_recorded_but_not_compared(self):
        config, _ = load_server_config(self.write("server:\n  port: 8081\n"))
        self.assertEqual(config.positions["server.port"], (2, 9))
        self.assertEqual(config, attrs.evolve(config, positions={}))

    def test_configs_are_frozen(self):
        self.assertRaises(attrs.exceptions.FrozenInstanceError,
                          setattr, default_server_config().server, "port", 1)
        self.assertIsInstance(default_server_config(), ServerConfig)


class LoadWorkerTests(_FileMixin, unittest.TestCase):

    def test_empty_file_is_defaults(self):
        path = self.write("")
        config, warnings = load_worker_config(path)
        self.assertEqual(config, attrs.evolve(default_worker_config(), source=path))
        self.assertEqual(warnings, [])

    def test_values(self):
        config, warnings = load_worker_config(self.write("""\
            path: /api
            type: command
            command: [python3, -m, http.server, "{port}", 8000]
            env: {DEBUG: true, COUNT: 3, NAME: x}
            memory_limit: 512MiB
            working_directory: project
            php:
              settings: {memory_limit: 128M}
              pool: {manager: static, max_workers: 8}
            scaling: {min_workers: 2, max_workers: 4, scale_down_delay: 30}
            kotlin: {main_class: "", jvm_args: [-Xmx256m]}
            """))
        self.assertEqual(warnings, [])
        self.assertEqual((config.path, config.type, config.working_directory),
                         ("/api", "command", "project"))
        self.assertEqual(config.command, ("python3", "-m", "http.server", "{port}", "8000"))
        self.assertEqual(config.env, {"DEBUG": "true", "COUNT": "3", "NAME": "x"})
        self.assertEqual(config.memory_limit, 512 * 1024 * 1024)
        self.assertEqual(config.php.settings, {"memory_limit": "128M"})
        self.assertEqual((config.php.pool.manager, config.php.pool.max_workers), ("static", 8))
        self.assertEqual((config.scaling.min_workers, config.scaling.max_workers), (2, 4))
        self.assertEqual(config.kotlin.jvm_args, ("-Xmx256m",))

    def test_runtime_alias_merged_go_wins(self):
        config, warnings = load_worker_config(self.write("""\
            runtime: {go_max_procs: 4, go_mem_limit: 256MiB, max_requests: 100}
            go: {max_requests: 7, build_flags: [-race]}
            """))
        self.assertEqual(warnings, [])
        self.assertEqual(config.go, GoConfig(4, "256MiB", 7, ("-race",)))

    def test_seed_top_level_go_keys(self):
        config, warnings = load_worker_config(self.write("""\
            go_max_procs: 8
            go_mem_limit: 1GiB
            runtime: {go_max_procs: 3}
            """))
        self.assertEqual(warnings, [])
        self.assertEqual((config.go.go_max_procs, config.go.go_mem_limit), (3, "1GiB"))

    def test_log_file_aliases(self):
        config, _ = load_worker_config(self.write("log_file: logs/a.log\n"))
        self.assertEqual(config.log_file, "logs/a.log")
        config, _ = load_worker_config(self.write("logging: {log_file: logs/b.log}\n"))
        self.assertEqual(config.log_file, "logs/b.log")
        config, _ = load_worker_config(self.write("logging:\n  log_file: ~\n"))
        self.assertIsNone(config.log_file)

    def test_legacy_keys_load_with_warnings(self):
        path = self.write("""\
            path: /blog
            document_root: public
            access_log: true
            port: 9001
            logging:
              level: debug
              log_file: logs/blog.log
            php:
              slow_log: logs/slow.log
              pool:
                listen_address: 127.0.0.1
                slow_log: x
            """)
        config, warnings = load_worker_config(path)
        self.assertEqual((config.path, config.log_file), ("/blog", "logs/blog.log"))
        self.assertEqual(config.php.pool.listen_address, "127.0.0.1")
        self.assertEqual([(w.key, w.line, w.column) for w in warnings], [
            ("document_root", 2, 1), ("access_log", 3, 1), ("port", 4, 1),
            ("logging.level", 6, 3), ("php.slow_log", 9, 3), ("php.pool.slow_log", 12, 5)])
        self.assertTrue(all(w.file == path for w in warnings))

    def test_unknown_key_suggestion(self):
        _, warnings = load_worker_config(self.write("strip_prefx: false\n"))
        self.assertEqual([w.message for w in warnings],
                         ["unknown key 'strip_prefx'; did you mean 'strip_prefix'?"])

    def test_unknown_type(self):
        err = self.assertError(load_worker_config, "type: pyhton\n",
                               1, 7, "type", "must be one of")
        self.assertIn("did you mean", err.message)

    def test_unknown_php_manager(self):
        self.assertError(load_worker_config, """\
            php:
              pool:
                manager: lazy
            """, 3, 14, "php.pool.manager", "dynamic, static, ondemand")

    def test_path_must_start_with_slash(self):
        self.assertError(load_worker_config, "path: api\n", 1, 7, "path", "'/'")

    def test_scaling_order(self):
        self.assertError(load_worker_config, "scaling: {min_workers: 3, max_workers: 2}\n",
                         1, 24, "scaling.min_workers", "max_workers")

    def test_scaling_order_blames_present_key(self):
        self.assertError(load_worker_config, "scaling:\n  min_workers: 2\n",
                         2, 16, "scaling.min_workers", "max_workers (1)")

    def test_negative_timeout(self):
        self.assertError(load_worker_config, "timeouts:\n  idle_timeout_seconds: -5\n",
                         2, 25, "timeouts.idle_timeout_seconds", ">= 0")

    def test_env_list_instead_of_map(self):
        self.assertError(load_worker_config, "env:\n  - A=1\n", 2, 3, "env",
                         "expected a mapping")

    def test_env_nested_value(self):
        self.assertError(load_worker_config, "env:\n  A: {b: 1}\n", 2, 6, "env.A",
                         "expected a string")

    def test_runtime_alias_checked(self):
        self.assertError(load_worker_config, "runtime:\n  go_max_procs: many\n",
                         2, 17, "runtime.go_max_procs", "expected an integer")

    def test_bad_memory_limit(self):
        self.assertError(load_worker_config, "memory_limit: lots\n", 1, 15,
                         "memory_limit", "invalid size")

    def test_bad_enabled(self):
        self.assertError(load_worker_config, "enabled: sometimes\n", 1, 10, "enabled",
                         "development")

    def test_command_type_needs_command(self):
        self.assertError(load_worker_config, "type: command\n", 1, 7, "type", "command")

    def test_yaml_syntax_error(self):
        path = self.write("path: /x\nenv: {A: 1\n")
        err = self.assertRaises(ConfigError, load_worker_config, path)
        self.assertEqual((err.file, err.line, err.column), (path, 3, 1))

    def test_missing_file(self):
        path = os.path.join(self.mktemp(), "worker.yaml")
        err = self.assertRaises(ConfigError, load_worker_config, path)
        self.assertEqual((err.file, err.message), (path, "file not found"))


class EnabledTests(_FileMixin, unittest.TestCase):

    def check(self, value, dev, prod):
        config, _ = load_worker_config(self.write(f"enabled: {value}\n"))
        self.assertEqual((config.enabled_in("dev"), config.enabled_in("prod")), (dev, prod))
        self.assertEqual((config.enabled_in("development"), config.enabled_in("production")),
                         (dev, prod))

    def test_true(self):
        self.check("true", True, True)

    def test_false(self):
        self.check("false", False, False)

    def test_development(self):
        self.check("development", True, False)

    def test_production(self):
        self.check('"production"', False, True)

    def test_default(self):
        self.assertTrue(WorkerConfig().enabled_in("prod"))


class ParseSizeTests(unittest.TestCase):

    def test_units(self):
        self.assertEqual(parse_size("512MiB"), 512 * 2 ** 20)
        self.assertEqual(parse_size("1G"), 2 ** 30)
        self.assertEqual(parse_size("100M"), 100 * 2 ** 20)
        self.assertEqual(parse_size("1024"), 1024)
        self.assertEqual(parse_size("4k"), 4096)
        self.assertEqual(parse_size("2 KB"), 2048)
        self.assertEqual(parse_size("1.5GiB"), 3 * 2 ** 29)
        self.assertEqual(parse_size("10B"), 10)

    def test_empty(self):
        self.assertEqual(parse_size(""), 0)
        self.assertEqual(parse_size("  "), 0)

    def test_bad(self):
        for text in ("lots", "12X", "-1M", "1.2.3", "M"):
            self.assertRaises(ValueError, parse_size, text)


class ErrorFormatTests(unittest.TestCase):

    def test_str_omits_missing_parts(self):
        self.assertEqual(str(ConfigError("boom", "a.yaml", 3, 4, "server.port")),
                         "a.yaml:3:4: server.port: boom")
        self.assertEqual(str(ConfigError("boom", "a.yaml", 3, None, None)), "a.yaml:3: boom")
        self.assertEqual(str(ConfigError("boom", "a.yaml", key="type")), "a.yaml: type: boom")
        self.assertEqual(str(ConfigError("boom")), "boom")
        self.assertEqual(str(ConfigWarning("a.yaml", 1, 2, "k", "hm")), "a.yaml:1:2: k: hm")
