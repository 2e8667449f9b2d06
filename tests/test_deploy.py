"""bin/deploy against a target directory on this machine, with a real `twistd tqserver`
serving its current release: releases and the current symlink, what the target built kept,
hooks in order, --dry-run, --rollback, a failing pre-deploy hook and a release that does not
start (both leave the previous release serving), and configuration errors."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from tqserver.config.deployment import load_deployment_config
from tqserver.config.errors import ConfigError

from .deploy_support import (
    Node,
    body_of,
    py_app,
    release_of,
    run_deploy,
    source_project,
)
from .support import Client, free_port, kill_leftovers, stop_twistd, wait_until


def d(coro):
    return defer.ensureDeferred(coro)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


class DeployTestBase(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.source = source_project(os.path.join(base, "project"))
        self.node = Node(os.path.join(base, "node"))
        self.hook_log = os.path.join(base, "hooks.log")
        self.env = {"HOOK_LOG": self.hook_log}
        self.deployment(self.node.target_yaml("local"))
        self.client = Client(self)

    def deployment(self, targets: str, extra: str = "") -> None:
        self.source.write("etc/deployment.yaml", "targets:\n" + targets + extra)

    def deploy(self, *args: str, **env: str):
        return run_deploy(self.source.root, *args, env={**self.env, **env})

    def hooks(self) -> list:
        """(hook, target, release, previous) per call, in order."""
        if not os.path.exists(self.hook_log):
            return []
        return [tuple([os.path.basename(p) for p in line.split()[:1]] + line.split()[1:])
                for line in read(self.hook_log).splitlines()]

    async def start_node(self, node: Node, expect: bytes = b"app v1", path: str = "/app/"):
        proc = node.start()
        self.addCleanup(kill_leftovers, node.current)
        self.addCleanup(lambda: None if proc.done else d(stop_twistd(proc)))

        async def serves():
            response, body = await self.client.get(node.url + path)
            return response.code == 200 and body == expect
        await wait_until(serves, 90, f"{node.root} serving {expect!r}", proc)

    async def health(self, node: Node) -> dict:
        """The full /health, on the node's admin listener (the public one in prod has no
        build detail)."""
        url = f"http://127.0.0.1:{node.admin_port}/health"
        return (await self.client.get_json(url))[1]


class DeployLocalTests(DeployTestBase):

    def test_deploy_keeps_what_the_target_built_and_rolls_back(self):
        return d(self._deploy_and_roll_back())

    async def _deploy_and_roll_back(self):
        node = self.node
        code, out = await self.deploy("local")           # no server yet: the first release
        self.assertEqual(code, 0, out)
        self.assertIn("no server running", out)
        first = release_of(out)
        self.assertEqual(node.releases(), [first])
        self.assertEqual(node.current_release(), first)
        self.assertEqual(read(os.path.join(node.current, "REVISION")).strip(), first)
        for shared in ("logs", "run"):                   # every release writes to shared/
            self.assertEqual(os.readlink(os.path.join(node.current, shared)),
                             os.path.join(node.root, "shared", shared))
        self.assertFalse(os.path.exists(os.path.join(node.current, "etc", "deployment.yaml.x")))
        await self.start_node(node)
        self.assertEqual((await self.health(node))["revision"], first)

        # What the target built or installed itself must survive the next deploy.
        built = ["workers/app/bin/built-here", "workers/app/node_modules/dep/index.js",
                 ".venv/bin/python-here"]
        for path in built:
            full = os.path.join(node.current, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write("target's own\n")

        self.source.write("workers/app/src/main.py", py_app("v2"))
        code, out = await self.deploy("local")
        self.assertEqual(code, 0, out)
        second = release_of(out)
        self.assertIn(f"[local] health: {second} serves", out)
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v2")
        health = await self.health(node)
        self.assertEqual((health["revision"], health["workers"]["app"]["revision"]),
                         (second, second))
        self.assertEqual(node.releases(), [first, second])
        for path in built:
            self.assertTrue(os.path.exists(os.path.join(node.current, path)), path)
        self.assertEqual(self.hooks(), [
            ("pre-deploy", "local", first, "prev="), ("post-deploy", "local", first, "prev="),
            ("pre-deploy", "local", second, f"prev={first}"),
            ("post-deploy", "local", second, f"prev={first}")])

        # --dry-run: what would change, and nothing changes.
        self.source.write("workers/app/src/main.py", py_app("v3"))
        code, out = await self.deploy("--dry-run", "local")
        self.assertEqual(code, 0, out)
        self.assertIn("workers/app/src/main.py", out)
        self.assertIn("would point current at releases/", out)
        self.assertEqual(node.releases(), [first, second])
        self.assertEqual(len(self.hooks()), 4)
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v2")

        # --rollback: the release before serves again.
        code, out = await self.deploy("--rollback", "local")
        self.assertEqual(code, 0, out)
        self.assertIn(f"[local] health: {first} serves", out)
        self.assertEqual(node.current_release(), first)
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v1")
        self.assertEqual((await self.health(node))["workers"]["app"]["revision"], first)

    def test_failures_leave_the_previous_release_serving(self):
        return d(self._failures())

    async def _failures(self):
        node = self.node
        code, out = await self.deploy("local")
        self.assertEqual(code, 0, out)
        first = release_of(out)
        await self.start_node(node)

        self.source.write("workers/app/src/main.py", py_app("v2"))
        code, out = await self.deploy("local", HOOK_EXIT="3")   # the pre-deploy hook fails
        self.assertEqual(code, 1, out)
        self.assertIn("step 'pre-deploy' failed: bin/hooks/pre-deploy exited with status 3", out)
        self.assertIn(f"nothing was changed: {first} still serves", out)
        self.assertEqual(node.releases(), [first])
        self.assertEqual([h[0] for h in self.hooks()], ["pre-deploy", "post-deploy",
                                                        "pre-deploy"])
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v1")

        # A release whose worker never starts: switched back, and the old code never stopped.
        self.source.write("workers/app/src/main.py", "raise SystemExit('broken on purpose')\n")
        code, out = await self.deploy("local")
        self.assertEqual(code, 1, out)
        self.assertIn("step 'health' failed: app: ", out)
        self.assertIn(f"{first} serves (current points to it again)", out)
        self.assertEqual(node.current_release(), first)
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v1")
        health = await self.health(node)
        self.assertEqual(health["revision"], first)
        self.assertEqual(health["workers"]["app"]["status"], "healthy")
        self.assertEqual(self.hooks()[-1][0], "pre-deploy")       # no post-deploy for it

        # The same fixed: it deploys (the broken release stays on disk, not current).
        self.source.write("workers/app/src/main.py", py_app("v4"))
        code, out = await self.deploy("local")
        self.assertEqual(code, 0, out)
        self.assertEqual(await body_of(self.client, node.url + "/app/"), b"app v4")
        self.assertEqual(len(node.releases()), 3)
        self.assertEqual(len([r for r in node.releases() if r.endswith(".failed")]), 1)
        code, out = await self.deploy("--rollback", "local")     # never to the failed one
        self.assertEqual(code, 0, out)
        self.assertEqual(node.current_release(), first)


class ConfigErrorTests(unittest.TestCase):

    def load(self, text: str):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path, lambda: load_deployment_config(path, "/project")

    def assertError(self, text: str, expected: str) -> None:
        path, load = self.load(text)
        with self.assertRaises(ConfigError) as caught:
            load()
        self.assertEqual(str(caught.exception), f"{path}:{expected}")

    def test_errors_name_file_line_column_and_key(self):
        self.assertError(
            "targets:\n  web1:\n    host: a\n    root: /srv\n    health_url: http://a/health\n"
            "    ssh:\n      port: twenty\n",
            "7:13: targets.web1.ssh.port: expected an integer, got string 'twenty'")
        self.assertError("targets:\n  web1:\n    health_url: http://a/health\n",
                         "2:3: targets.web1: root is required: the directory that holds "
                         "the releases")
        self.assertError(
            "targets:\n  web1:\n    host: a\n    root: srv\n    health_url: http://a/health\n",
            "4:11: targets.web1.root: must be an absolute path on the host")
        self.assertError(
            "targets:\n  web1:\n    root: /srv\n    health_url: http://a/health\n"
            "    build: remote\n",
            "5:12: targets.web1.build: must be one of target, local, got string 'remote'")
        self.assertError(
            "targets:\n  web1:\n    root: /srv\n    health_url: http://a/health\n"
            "groups:\n  all: [web1, web2]\n",
            "6:15: groups.all[1]: no target named 'web2'")
        self.assertError("targets: {}\n", "1:1: targets: no target defined")

    def test_local_roots_are_relative_to_the_project_and_unknown_keys_warn(self):
        path, load = self.load(
            "targets:\n  here:\n    root: ../node\n    health_url: http://a/health\n"
            "    helth_url: x\ngroups:\n  all: [here]\n")
        config, warnings = load()
        self.assertEqual(config.targets["here"].root, "/node")
        self.assertEqual([t.name for t in config.resolve("all")], ["here"])
        self.assertEqual([str(w) for w in warnings], [
            f"{path}:5:5: targets.here.helth_url: unknown key 'helth_url'; "
            "did you mean 'health_url'?"])

    def test_bin_deploy_reports_the_error_and_exits_2(self):
        return d(self._bin_deploy_error())

    async def _bin_deploy_error(self):
        source = source_project(os.path.abspath(self.mktemp()))
        source.write("etc/deployment.yaml",
                     "targets:\n  web1:\n    root: /srv\n    health_url: ftp://x\n")
        code, out = await run_deploy(source.root, "web1")
        self.assertEqual(code, 2, out)
        self.assertIn("etc/deployment.yaml:4:17: targets.web1.health_url: expected an http:// "
                      "or https:// URL, got 'ftp://x'", out)
        source.write("etc/deployment.yaml",
                     "targets:\n  web1:\n    root: /srv\n    health_url: http://x/health\n")
        code, out = await run_deploy(source.root, "web2")
        self.assertEqual(code, 2, out)
        self.assertIn("no target or group 'web2'", out)


SSHD = "/usr/sbin/sshd"


class SshTargetTests(DeployTestBase):
    """The same over ssh: an sshd of this test on a loopback port (its own host key and
    authorized_keys, run as the current user), the target named by host and ssh port."""

    def setUp(self) -> None:
        if not (os.access(SSHD, os.X_OK) and shutil.which("ssh") and shutil.which("ssh-keygen")):
            raise unittest.SkipTest("sshd, ssh or ssh-keygen is not installed")
        if os.getuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege separation directory
            self.addCleanup(lambda: os.rmdir("/run/sshd"))
        DeployTestBase.setUp(self)

    def test_deploy_over_ssh(self):
        return d(self._over_ssh())

    async def _over_ssh(self):
        keys = tempfile.mkdtemp(prefix="tqs-ssh-")
        self.addCleanup(shutil.rmtree, keys, True)
        for name in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            os.path.join(keys, name)], check=True)
        shutil.copy(os.path.join(keys, "user.pub"), os.path.join(keys, "authorized_keys"))
        port = free_port()
        with open(os.path.join(keys, "sshd_config"), "w") as f:
            f.write(f"ListenAddress 127.0.0.1:{port}\nHostKey {keys}/host\n"
                    f"AuthorizedKeysFile {keys}/authorized_keys\nPidFile {keys}/sshd.pid\n"
                    "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n")
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", os.path.join(keys, "sshd_config")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (sshd.terminate(), sshd.wait(10)))
        user = pwd.getpwuid(os.getuid()).pw_name
        self.deployment(self.node.target_yaml(
            "web1", host="127.0.0.1",
            ssh=f"{{user: {user}, port: {port}, identity_file: {keys}/user, options: "
                f"[-o, 'UserKnownHostsFile={keys}/known_hosts', -o, "
                "StrictHostKeyChecking=accept-new]}"))

        async def sshd_up():
            return subprocess.run(["ssh", "-p", str(port), "-i", f"{keys}/user", "-o",
                                   f"UserKnownHostsFile={keys}/known_hosts", "-o",
                                   "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes",
                                   f"{user}@127.0.0.1", "true"],
                                  capture_output=True).returncode == 0
        await wait_until(sshd_up, 20, "sshd on loopback")

        code, out = await self.deploy("web1")
        self.assertEqual(code, 0, out)
        self.assertIn(f"rsync to {user}@127.0.0.1:{self.node.root}/releases/", out)
        await self.start_node(self.node)
        self.source.write("workers/app/src/main.py", py_app("v2 over ssh"))
        code, out = await self.deploy("web1")
        self.assertEqual(code, 0, out)
        self.assertIn(f"[web1] health: {release_of(out)} serves", out)
        self.assertEqual(await body_of(self.client, self.node.url + "/app/"), b"app v2 over ssh")
        code, out = await self.deploy("--rollback", "web1")
        self.assertEqual(code, 0, out)
        self.assertEqual(await body_of(self.client, self.node.url + "/app/"), b"app v1")


GO_MAIN = """package main

import (
\t"net/http"
\t"os"
)

func main() {
\thttp.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("go VERSION")) })
\thttp.ListenAndServe("127.0.0.1:"+os.Getenv("WORKER_PORT"), nil)
}
"""
BUN_MAIN = """Bun.serve({hostname: "127.0.0.1", port: Number(process.env.WORKER_PORT),
  fetch() { return new Response("bun VERSION"); }});
"""
PHP_MAIN = "<?php echo 'php VERSION';\n"


class PolyglotDeployTests(DeployTestBase):
    """A Go, a Bun, a PHP and a Python worker deployed together, built on the target; then
    the Go worker built here (build: local) and its binary shipped."""

    def setUp(self) -> None:
        from tqserver.runtimes import ToolchainMissing
        from tqserver.runtimes.bun import BunRuntime
        from tqserver.runtimes.php import find_php_fpm

        from .support import find_go
        try:
            BunRuntime().bun()
        except ToolchainMissing as e:
            raise unittest.SkipTest(str(e)) from None
        if find_go() is None or find_php_fpm() is None:
            raise unittest.SkipTest("Go or php-fpm is not installed")
        DeployTestBase.setUp(self)
        w = self.source.write
        w("workers/gosvc/config/worker.yaml", 'path: "/go"\ntype: go\n')
        w("workers/gosvc/go.mod", "module gosvc\n\ngo 1.19\n")
        w("workers/bunsvc/config/worker.yaml", 'path: "/bun"\ntype: bun\nbun:\n'
          '  entrypoint: "index.ts"\n')
        w("workers/bunsvc/package.json", '{"name": "bunsvc", "private": true}\n')
        w("workers/phpsvc/config/worker.yaml", 'path: "/php"\ntype: php\n')
        self.version("v1")
        self.deployment(self.node.target_yaml("web1")
                        + self.node.target_yaml("artifacts", build="local"))

    def version(self, v: str) -> None:
        w = self.source.write
        w("workers/gosvc/src/main.go", GO_MAIN.replace("VERSION", v))
        w("workers/bunsvc/index.ts", BUN_MAIN.replace("VERSION", v))
        w("workers/phpsvc/public/index.php", PHP_MAIN.replace("VERSION", v))
        w("workers/app/src/main.py", py_app(v))

    async def serves(self, v: str) -> None:
        for path, name in (("/go/", "go"), ("/bun/", "bun"), ("/php/", "php"), ("/app/", "app")):
            self.assertEqual(await body_of(self.client, self.node.url + path),
                             f"{name} {v}".encode(), path)

    def test_go_bun_php_python(self):
        return d(self._polyglot())

    async def _polyglot(self):
        code, out = await self.deploy("web1")
        self.assertEqual(code, 0, out)
        await self.start_node(self.node, expect=b"go v1", path="/go/")
        await wait_until(self._all_healthy, 120, "every worker healthy")
        await self.serves("v1")

        self.version("v2")
        code, out = await self.deploy("web1")
        self.assertEqual(code, 0, out)
        await self.serves("v2")

        before = (await self.health(self.node))["workers"]["gosvc"]["last_build"]
        self.source.write("workers/gosvc/src/main.go", GO_MAIN.replace("VERSION", "v3"))
        code, out = await self.deploy("artifacts", "gosvc")
        self.assertEqual(code, 0, out)
        self.assertIn("[artifacts] build: bin/build-prod gosvc", out)
        self.assertEqual(await body_of(self.client, self.node.url + "/go/"), b"go v3")
        health = await self.health(self.node)
        self.assertEqual(health["workers"]["gosvc"]["last_build"], before)  # not built there

    async def _all_healthy(self):
        workers = (await self.health(self.node))["workers"]
        return len(workers) == 4 and all(w["status"] == "healthy" for w in workers.values())
