"""bin/deploy in tests: a project to deploy from, target roots with releases, a real
`twistd tqserver` serving a target's ``current`` release, and bin/deploy run as users run
it."""
from __future__ import annotations

import os
import re

from twisted.internet import reactor, utils

from .support import REPO, Client, Project, TwistdProcess, find_go, free_port, twistd_argv

PY_APP = """
from tqserver.worker import serve

VERSION = "v1"

def app(environ, start_response):
    body = ("app %s" % VERSION).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

serve(app)
"""

HOOK = """#!/bin/sh
echo "$0 $TQSERVER_DEPLOY_TARGET $TQSERVER_DEPLOY_RELEASE prev=$TQSERVER_DEPLOY_PREVIOUS" \
    >> "$HOOK_LOG"
exit "${HOOK_EXIT:-0}"
"""


def py_app(version: str) -> str:
    return PY_APP.replace('VERSION = "v1"', f'VERSION = "{version}"')


def deploy_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A user's environment for bin/deploy: no PYTHONPATH of ours (under trial -j it holds
    this interpreter's whole path), the toolchains on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    go = find_go()
    if go:
        env["PATH"] = os.path.dirname(go) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


async def run_deploy(source: str, *args: str, env: dict[str, str] | None = None):
    """(exit status, stdout + stderr) of ``bin/deploy --root SOURCE ARGS``."""
    out, err, code = await utils.getProcessOutputAndValue(
        os.path.join(REPO, "bin", "deploy"), ("--root", source, *args),
        env=deploy_env(env), path=source)
    return code, (out + err).decode("utf-8", "replace")


def release_of(output: str) -> str:
    """The release a successful bin/deploy run names on its last line."""
    match = re.search(r"bin/deploy: release (\S+) on ", output)
    assert match, output
    return match.group(1)


class Node:
    """A target root on this machine and the server that runs its current release."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()  # its own: every node runs the same server.yaml
        self.proc: TwistdProcess | None = None

    @property
    def current(self) -> str:
        return os.path.join(self.root, "current")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def releases(self) -> list[str]:
        path = os.path.join(self.root, "releases")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def current_release(self) -> str:
        return os.path.basename(os.readlink(self.current))

    def target_yaml(self, name: str, **extra: str) -> str:
        lines = [f"  {name}:", f"    root: {self.root}",
                 f"    health_url: {self.url}/health", "    health_timeout_seconds: 90"]
        lines += [f"    {k}: {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def start(self) -> TwistdProcess:
        """`twistd -n tqserver --mode prod --root <root>/current` with its pidfile where
        bin/deploy looks (shared/run/tqserver.pid)."""
        proto = TwistdProcess()
        env = deploy_env({"PYTHONPATH": REPO})
        pidfile = os.path.join(self.root, "shared", "run", "tqserver.pid")
        argv = [*twistd_argv(), "-n", "--pidfile", pidfile, "tqserver", "--root", self.current,
                "--mode", "prod", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--admin-listen", f"tcp:{self.admin_port}:interface=127.0.0.1"]
        reactor.spawnProcess(proto, argv[0], argv, env=env, path=self.root)
        self.proc = proto
        return proto


def source_project(root: str, **settings) -> Project:
    """The project bin/deploy ships: etc/server.yaml, one Python worker "app", hooks that
    log their calls to $HOOK_LOG."""
    project = Project(root, **settings)
    project.write("workers/app/config/worker.yaml", 'path: "/app"\ntype: python\n')
    project.write("workers/app/src/main.py", py_app("v1"))
    for name in ("pre-deploy", "post-deploy"):
        os.chmod(project.write(f"bin/hooks/{name}", HOOK), 0o755)
    return project


async def body_of(client: Client, url: str) -> bytes:
    response, body = await client.get(url)
    assert response.code == 200, (url, response.code, body)
    return body
