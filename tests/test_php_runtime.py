"""The PHP runtime (the php-fpm config it writes, finding php-fpm, what a missing one
does to a pool) and the CGI side of requests (script mapping, CGI params)."""
from __future__ import annotations

import os
import signal
import stat

import attrs
from twisted.internet import address
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config
from tqserver.config.worker import PhpConfig, PhpPoolConfig, load_worker_config
from tqserver.fastcgi.cgi import Script, cgi_params, resolve_script
from tqserver.runtimes import ToolchainMissing, runtime_for
from tqserver.runtimes import php as php_runtime
from tqserver.runtimes.php import PhpRuntime, connection_limit, find_php_fpm, fpm_config, ini_value
from tqserver.supervise import instance as process
from tqserver.supervise.instance import Instance
from tqserver.supervise.pool import PoolContext, WorkerPool
from tqserver.supervise.ports import PortPool

from .fakes import FakeProcessReactor, GroupSignals, ScriptedProbe
from .php_support import php_spec


def conf_lines(text: str) -> dict:
    """The pool section of a generated php-fpm config, as a dict (last value wins)."""
    pool = text.split("\n[", 2)[-1]
    out = {}
    for line in pool.splitlines()[1:]:
        if "=" in line and not line.startswith(";"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


class FpmConfigTests(unittest.TestCase):

    def spec(self, settings=None, **pool):
        return php_spec(os.path.abspath(self.mktemp()), settings, **pool)

    def test_global_section_and_pool(self):
        text = fpm_config(self.spec(), 9123, "/r/run/php/t-1.pid", dev=False)
        head = text.split("\n[t]")[0]
        self.assertIn("pid = /r/run/php/t-1.pid", head)
        self.assertIn("error_log = /proc/self/fd/2", head)
        self.assertIn("daemonize = no", head)
        conf = conf_lines(text)
        self.assertEqual(conf["listen"], "127.0.0.1:9123")
        self.assertEqual(conf["pm"], "dynamic")
        self.assertEqual((conf["pm.max_children"], conf["pm.start_servers"],
                          conf["pm.min_spare_servers"], conf["pm.max_spare_servers"]),
                         ("5", "2", "1", "5"))
        self.assertEqual(conf["pm.max_requests"], "0")
        self.assertEqual(conf["request_terminate_timeout"], "30s")
        self.assertEqual(conf["pm.process_idle_timeout"], "10s")
        self.assertEqual((conf["ping.path"], conf["ping.response"]), ("/fpm-ping", "pong"))
        self.assertEqual((conf["catch_workers_output"], conf["decorate_workers_output"],
                          conf["clear_env"]), ("yes", "no", "no"))
        self.assertNotIn("user", conf)

    def test_pool_settings_mapped(self):
        conf = conf_lines(fpm_config(self.spec(min_workers=2, max_workers=8, start_workers=3,
                                               max_requests=500, request_timeout=12,
                                               idle_timeout=4), 1, "/p", dev=False))
        self.assertEqual((conf["pm.max_children"], conf["pm.start_servers"],
                          conf["pm.min_spare_servers"], conf["pm.max_spare_servers"],
                          conf["pm.max_requests"], conf["request_terminate_timeout"],
                          conf["pm.process_idle_timeout"]),
                         ("8", "3", "2", "8", "500", "12s", "4s"))

    def test_dynamic_start_is_clamped_to_what_php_fpm_accepts(self):
        conf = conf_lines(fpm_config(self.spec(min_workers=0, max_workers=3, start_workers=0),
                                     1, "/p", dev=False))
        self.assertEqual((conf["pm.min_spare_servers"], conf["pm.start_servers"]), ("1", "1"))

    def test_static_and_ondemand(self):
        for manager in ("static", "ondemand"):
            conf = conf_lines(fpm_config(self.spec(manager=manager, max_workers=4), 1, "/p",
                                         dev=False))
            self.assertEqual((conf["pm"], conf["pm.max_children"]), (manager, "4"))
            self.assertNotIn("pm.start_servers", conf)

    def test_dev_revalidates_every_script(self):
        dev = conf_lines(fpm_config(self.spec(), 1, "/p", dev=True))
        self.assertEqual(dev["php_admin_value[opcache.validate_timestamps]"], "1")
        self.assertEqual(dev["php_admin_value[opcache.revalidate_freq]"], "0")
        self.assertEqual(dev["php_value[display_errors]"], "On")
        prod = conf_lines(fpm_config(self.spec(), 1, "/p", dev=False))
        self.assertNotIn("php_admin_value[opcache.revalidate_freq]", prod)
        self.assertNotIn("php_value[display_errors]", prod)

    def test_settings_become_admin_values_and_win(self):
        conf = conf_lines(fpm_config(self.spec({"memory_limit": "64M",
                                                "opcache.revalidate_freq": "5",
                                                "error_reporting": "E_ALL & ~E_NOTICE",
                                                "display_errors": "Off",
                                                "default_mimetype": "text/html; charset=x"}),
                                     1, "/p", dev=True))
        self.assertEqual(conf["php_admin_value[memory_limit]"], "64M")
        self.assertEqual(conf["php_admin_value[opcache.revalidate_freq]"], "5")
        self.assertEqual(conf["php_admin_value[error_reporting]"], "E_ALL & ~E_NOTICE")
        self.assertEqual(conf["php_admin_value[display_errors]"], "Off")
        self.assertNotIn("php_value[display_errors]", conf)
        self.assertEqual(conf["php_admin_value[default_mimetype]"], '"text/html; charset=x"')

    def test_ini_values(self):
        self.assertEqual(ini_value("64M"), "64M")
        self.assertEqual(ini_value("/tmp/x y"), "/tmp/x y")
        self.assertEqual(ini_value(""), '""')
        self.assertEqual(ini_value("a;b"), '"a;b"')
        self.assertEqual(ini_value(" padded"), '" padded"')

    def test_root_names_a_user(self):
        conf = conf_lines(fpm_config(self.spec(), 1, "/p", dev=False, user=("root", "root")))
        self.assertEqual((conf["user"], conf["group"]), ("root", "root"))

    def test_connection_limit_leaves_a_child_for_the_probe(self):
        self.assertEqual(connection_limit(PhpPoolConfig(max_workers=5)), (4, True))
        self.assertEqual(connection_limit(PhpPoolConfig(max_workers=2)), (1, True))
        self.assertEqual(connection_limit(PhpPoolConfig(max_workers=1)), (1, False))


class SettingsValidationTests(unittest.TestCase):

    def load(self, text: str):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return load_worker_config(path)

    def test_good_settings(self):
        config, warnings = self.load("type: php\nphp:\n  settings:\n    memory_limit: 64M\n"
                                     "    display_errors: true\n    date.timezone: UTC\n")
        self.assertEqual(config.php.settings, {"memory_limit": "64M", "display_errors": "true",
                                               "date.timezone": "UTC"})
        self.assertEqual(warnings, [])

    def test_bad_name_and_value(self):
        with self.assertRaises(ConfigError) as e:
            self.load("type: php\nphp:\n  settings:\n    'memory limit': 64M\n")
        self.assertIn("php.settings.memory limit", str(e.exception))
        self.assertIn(":4:", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            self.load('type: php\nphp:\n  settings:\n    x: \'a"b\'\n')
        self.assertIn("double quotes", str(e.exception))


def executable(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


class FindPhpFpmTests(unittest.TestCase):

    def setUp(self) -> None:
        self.bin = os.path.abspath(self.mktemp())
        self.patch(php_runtime, "SYSTEM_DIRS", ())
        self.patch(os, "environ", dict(os.environ, PATH=self.bin))

    def test_plain_name_first(self):
        executable(os.path.join(self.bin, "php-fpm8.3"))
        plain = executable(os.path.join(self.bin, "php-fpm"))
        self.assertEqual(find_php_fpm(), plain)

    def test_newest_version(self):
        executable(os.path.join(self.bin, "php-fpm7.4"))
        newest = executable(os.path.join(self.bin, "php-fpm8.10"))
        executable(os.path.join(self.bin, "php-fpm8.2"))
        self.assertEqual(find_php_fpm(), newest)

    def test_sbin_when_not_on_path(self):
        sbin = os.path.abspath(self.mktemp())
        found = executable(os.path.join(sbin, "php-fpm8.2"))
        self.patch(php_runtime, "SYSTEM_DIRS", (sbin,))
        self.assertEqual(find_php_fpm(), found)

    def test_none(self):
        os.makedirs(self.bin)
        self.assertIsNone(find_php_fpm())
        with self.assertRaises(ToolchainMissing) as e:
            PhpRuntime().build_steps(php_spec(self.bin))
        self.assertIn("install php-fpm (apt-get install php-fpm, or bin/install-toolchains "
                      "--only php)", str(e.exception))

    def test_configured_binary(self):
        spec = php_spec(self.bin)
        spec = attrs.evolve(spec, config=attrs.evolve(spec.config, php=PhpConfig(
            binary="/nonexistent/php-fpm")))
        with self.assertRaises(ToolchainMissing) as e:
            PhpRuntime().build_steps(spec)
        self.assertIn("php.binary /nonexistent/php-fpm", str(e.exception))
        self.assertIn("install php-fpm", str(e.exception))
        mine = executable(os.path.join(self.bin, "my-fpm"))
        spec = attrs.evolve(spec, config=attrs.evolve(spec.config, php=PhpConfig(binary=mine)))
        self.assertEqual(PhpRuntime().binary(spec), mine)


class LaunchTests(unittest.TestCase):

    def setUp(self) -> None:
        self.bin = os.path.abspath(self.mktemp())
        self.fpm = executable(os.path.join(self.bin, "php-fpm"))
        self.patch(os, "environ", dict(os.environ, PATH=self.bin))
        self.root = os.path.abspath(self.mktemp())
        self.spec = php_spec(os.path.join(self.root, "workers", "t"))

    def test_launch_writes_the_config_and_runs_in_the_foreground(self):
        launch = PhpRuntime().launch(self.spec, 9200, "api/v1#3", self.root, "dev")
        conf = os.path.join(self.root, "run", "php", "api_v1-3.conf")
        self.assertEqual(launch.argv[:5], [self.fpm, "-F", "-O", "-y", conf])
        pid = os.path.join(self.root, "run", "php", "api_v1-3.pid")
        self.assertEqual(launch.files, (conf, pid))
        with open(conf) as f:
            self.assertIn("listen = 127.0.0.1:9200", f.read())
        self.assertEqual("-R" in launch.argv, os.geteuid() == 0)

    def test_config_file(self):
        ini = os.path.join(self.spec.directory, "php.ini")
        os.makedirs(self.spec.directory)
        with open(ini, "w") as f:
            f.write("memory_limit = 32M\n")
        spec = attrs.evolve(self.spec, config=attrs.evolve(self.spec.config, php=PhpConfig(
            config_file="php.ini")))
        launch = PhpRuntime().launch(spec, 9200, "t#1", self.root, "prod")
        self.assertEqual(launch.argv[5:7], ["-c", ini])
        missing = attrs.evolve(spec, config=attrs.evolve(spec.config, php=PhpConfig(
            config_file="nope.ini")))
        with self.assertRaises(Exception) as e:
            PhpRuntime().build_steps(missing)
        self.assertIn("php.config_file nope.ini: no such file", str(e.exception))

    def test_registered(self):
        runtime = runtime_for("php")
        self.assertIsInstance(runtime, PhpRuntime)
        self.assertEqual((runtime.probe.protocol, runtime.probe.path, runtime.probe.expect),
                         ("fastcgi", "/fpm-ping", b"pong"))


class InstanceFilesTests(unittest.TestCase):
    """Generated files go when the instance does; a missing php-fpm fails the pool once."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.signals = GroupSignals(self.reactor)
        self.patch(process, "signal_group", self.signals)

    def test_files_removed_on_exit(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        inst = Instance(self.reactor, "w", "w#1", 1, ["x"], {}, "/", lambda data: None,
                        files=[path])
        inst.start()
        self.assertTrue(os.path.exists(path))
        inst.stop(1.0)
        self.assertFalse(os.path.exists(path))

    def test_missing_php_fpm_fails_the_worker_without_retrying(self):
        self.patch(php_runtime, "find_php_fpm", lambda: None)
        root = os.path.abspath(self.mktemp())
        ctx = PoolContext(reactor=self.reactor, root=root, mode="dev",
                          ports=PortPool(9000, 9010, is_free=lambda p: True),
                          settings=lambda: default_server_config().workers,
                          probe=ScriptedProbe())
        pool = WorkerPool(php_spec(root), PhpRuntime(), ctx)
        pool.startService()
        self.reactor.advance(60)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(pool.status, "failed")
        self.assertIn("install php-fpm", pool.error)
        pool.stopService()


class RetireTests(unittest.TestCase):
    """A retired php-fpm is stopped gracefully (SIGQUIT), and only once the proxy has no
    request in flight on it, however long past the usual grace period that takes."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.signals = GroupSignals(self.reactor)
        self.patch(process, "signal_group", self.signals)
        self.patch(php_runtime, "find_php_fpm", lambda: "/usr/sbin/php-fpm")
        root = os.path.abspath(self.mktemp())
        ctx = PoolContext(reactor=self.reactor, root=root, mode="prod",
                          ports=PortPool(9000, 9010, is_free=lambda p: True),
                          settings=lambda: default_server_config().workers,
                          probe=ScriptedProbe())
        self.pool = WorkerPool(php_spec(os.path.join(root, "w"), request_timeout=20),
                               PhpRuntime(), ctx)
        self.pool.startService()
        self.reactor.advance(0.2)
        [self.old] = self.pool.serving
        self.old.request_started()
        self.pool.deploy("SIGHUP")
        self.reactor.advance(0.2)
        self.assertNotIn(self.old, self.pool.serving)

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.reactor.advance(0.1)

    def test_waits_for_in_flight_requests(self):
        self.advance(5.0)                             # far past shutdown_grace_period_ms
        self.assertEqual(self.signals.sent, [])
        self.old.request_finished()
        self.assertEqual(self.signals.sent, [(self.old.pid, signal.SIGQUIT)])

    def test_until_the_request_timeout(self):
        self.advance(19.5)
        self.assertEqual(self.signals.sent, [])
        self.advance(1.0)
        self.assertEqual(self.signals.sent, [(self.old.pid, signal.SIGQUIT)])

    def tearDown(self):
        self.pool.stopService()
        self.reactor.advance(10)


# -- the CGI side ------------------------------------------------------------------------

def write(path: str, text: str = "<?php\n") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


class ResolveScriptTests(unittest.TestCase):

    def setUp(self) -> None:
        base = os.path.realpath(os.path.abspath(self.mktemp()))
        self.public = os.path.join(base, "public")
        self.index = write(os.path.join(self.public, "index.php"))
        self.x = write(os.path.join(self.public, "x.php"))
        self.admin = write(os.path.join(self.public, "admin", "index.php"))
        write(os.path.join(self.public, "style.css"), "body{}")
        write(os.path.join(self.public, ".hidden", "secret.php"))
        write(os.path.join(self.public, "upper.PHP"))
        os.makedirs(os.path.join(self.public, "dir.php"))
        self.outside = write(os.path.join(base, "outside.php"))
        os.symlink(self.outside, os.path.join(self.public, "link.php"))
        os.symlink(os.path.join(self.public, "style.css"), os.path.join(self.public, "css.php"))

    def resolve(self, path: bytes):
        return resolve_script(self.public, path)

    def script(self, filename: str, name: str, path_info: str) -> Script:
        return Script(filename, name, path_info, self.public)

    def test_root_and_directories_run_their_index(self):
        self.assertEqual(self.resolve(b"/"), self.script(self.index, "/index.php", ""))
        self.assertEqual(self.resolve(b"/admin/"), self.script(self.admin, "/admin/index.php", ""))

    def test_a_script_and_its_path_info(self):
        self.assertEqual(self.resolve(b"/x.php"), self.script(self.x, "/x.php", ""))
        self.assertEqual(self.resolve(b"/x.php/extra/more"),
                         self.script(self.x, "/x.php", "/extra/more"))
        self.assertEqual(self.resolve(b"/x.php/"), self.script(self.x, "/x.php", "/"))
        self.assertEqual(self.resolve(b"/x%2Ephp/a%20b"), self.script(self.x, "/x.php", "/a b"))

    def test_front_controller(self):
        for path, info in ((b"/posts/1", "/posts/1"), (b"/admin", "/admin"),
                           (b"/missing.php", "/missing.php"), (b"/nope/", "/nope/"),
                           (b"/.hidden/secret.php", "/.hidden/secret.php"),
                           (b"/upper.PHP", "/upper.PHP"), (b"/dir.php/x", "/dir.php/x")):
            self.assertEqual(self.resolve(path), self.script(self.index, "/index.php", info), path)

    def test_never_outside_public(self):
        self.assertEqual(self.resolve(b"/link.php").filename, self.index)   # front controller
        self.assertEqual(self.resolve(b"/css.php").filename, self.index)    # not really .php
        self.assertIsNone(self.resolve(b"/x.php%00.txt"))
        self.assertIsNone(self.resolve(b"/a\\b"))

    def test_no_index_no_script(self):
        os.unlink(self.index)
        self.assertIsNone(self.resolve(b"/posts/1"))
        self.assertEqual(self.resolve(b"/x.php").filename, self.x)


class FakeRequest:
    def __init__(self, method=b"GET", uri=b"/blog/x.php/extra?a=1", headers=(), secure=False):
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.clientproto = b"HTTP/1.1"
        self.requestHeaders = Headers()
        for name, value in headers:
            self.requestHeaders.addRawHeader(name, value)
        self._secure = secure

    def isSecure(self):
        return self._secure

    def getClientAddress(self):
        return address.IPv4Address("TCP", "10.1.2.3", 54321)

    def getHost(self):
        return address.IPv4Address("TCP", "127.0.0.1", 8080)


class CGIParamsTests(unittest.TestCase):
    SKIP = frozenset([b"connection", b"proxy", b"x-forwarded-for", b"keep-alive"])

    X = Script("/srv/public/x.php", "/x.php", "/extra", "/srv/public")

    def params(self, request, script=X, route="/blog", forwarded=()):
        return dict(cgi_params(request, script, route, forwarded, self.SKIP))

    def test_cgi_variables(self):
        p = self.params(FakeRequest(headers=[(b"Host", b"shop.example:8080")]))
        self.assertEqual(p[b"GATEWAY_INTERFACE"], b"CGI/1.1")
        self.assertEqual(p[b"SERVER_PROTOCOL"], b"HTTP/1.1")
        self.assertEqual(p[b"REQUEST_METHOD"], b"GET")
        self.assertEqual(p[b"REQUEST_URI"], b"/blog/x.php/extra?a=1")
        self.assertEqual(p[b"QUERY_STRING"], b"a=1")
        self.assertEqual(p[b"SCRIPT_FILENAME"], b"/srv/public/x.php")
        self.assertEqual(p[b"SCRIPT_NAME"], b"/blog/x.php")
        self.assertEqual(p[b"PATH_INFO"], b"/extra")
        self.assertEqual(p[b"PATH_TRANSLATED"], b"/srv/public/extra")
        self.assertEqual(p[b"DOCUMENT_ROOT"], b"/srv/public")
        self.assertEqual(p[b"DOCUMENT_URI"], b"/blog/x.php/extra")
        self.assertEqual((p[b"REMOTE_ADDR"], p[b"REMOTE_PORT"]), (b"10.1.2.3", b"54321"))
        self.assertEqual((p[b"SERVER_ADDR"], p[b"SERVER_PORT"]), (b"127.0.0.1", b"8080"))
        self.assertEqual(p[b"SERVER_NAME"], b"shop.example")
        self.assertEqual(p[b"REQUEST_SCHEME"], b"http")
        self.assertTrue(p[b"SERVER_SOFTWARE"].startswith(b"TQServer/"))
        self.assertNotIn(b"HTTPS", p)
        self.assertNotIn(b"CONTENT_LENGTH", p)

    def test_root_route_and_no_path_info(self):
        index = Script("/srv/public/index.php", "/index.php", "", "/srv/public")
        p = self.params(FakeRequest(uri=b"/"), index, route="/")
        self.assertEqual(p[b"SCRIPT_NAME"], b"/index.php")
        self.assertEqual(p[b"PATH_INFO"], b"")
        self.assertNotIn(b"PATH_TRANSLATED", p)
        self.assertEqual(p[b"QUERY_STRING"], b"")

    def test_https(self):
        p = self.params(FakeRequest(secure=True))
        self.assertEqual((p[b"HTTPS"], p[b"REQUEST_SCHEME"]), (b"on", b"https"))

    def test_body_headers(self):
        p = self.params(FakeRequest(method=b"POST", headers=[
            (b"Content-Type", b"application/x-www-form-urlencoded"), (b"Content-Length", b"12")]))
        self.assertEqual(p[b"CONTENT_TYPE"], b"application/x-www-form-urlencoded")
        self.assertEqual(p[b"CONTENT_LENGTH"], b"12")
        self.assertNotIn(b"HTTP_CONTENT_TYPE", p)
        self.assertNotIn(b"HTTP_CONTENT_LENGTH", p)

    def test_http_headers(self):
        p = self.params(FakeRequest(headers=[
            (b"Accept", b"text/html"), (b"Accept", b"*/*"), (b"Cookie", b"a=1"),
            (b"Cookie", b"b=2"), (b"Proxy", b"http://evil:8080"), (b"Connection", b"close"),
            (b"X_Sneaky", b"1"), (b"X-Forwarded-For", b"6.6.6.6"), (b"User-Agent", b"ua")]),
            forwarded=[(b"X-Forwarded-For", b"10.1.2.3"), (b"X-Request-ID", b"rid")])
        self.assertEqual(p[b"HTTP_ACCEPT"], b"text/html, */*")
        self.assertEqual(p[b"HTTP_COOKIE"], b"a=1; b=2")
        self.assertEqual(p[b"HTTP_USER_AGENT"], b"ua")
        self.assertEqual(p[b"HTTP_X_FORWARDED_FOR"], b"10.1.2.3")
        self.assertEqual(p[b"HTTP_X_REQUEST_ID"], b"rid")
        for absent in (b"HTTP_PROXY", b"HTTP_CONNECTION", b"HTTP_X_SNEAKY"):
            self.assertNotIn(absent, p)

    def test_absolute_form_target(self):
        request = FakeRequest(uri=b"http://h/blog/x.php?q")
        request.path = b"/blog/x.php"
        self.assertEqual(self.params(request)[b"REQUEST_URI"], b"/blog/x.php?q")
