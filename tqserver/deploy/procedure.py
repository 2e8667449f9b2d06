"""A deploy, step by step, each step named so a failure says which one failed, and what
serves afterwards: until ``current`` is switched nothing the server reads has changed; after
that, a release that does not serve is switched back and the server told again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

import attrs

from tqserver.config.deployment import DeploymentConfig, TargetConfig
from tqserver.deploy import releases
from tqserver.deploy.haproxy import BalancerError, HAProxy
from tqserver.deploy.health import NotServing, wait_until_serving
from tqserver.deploy.host import Host
from tqserver.deploy.releases import ReleaseError
from tqserver.deploy.sync import rsync_argv


class StepFailed(Exception):
    def __init__(self, target: str, step: str, message: str, serving: str) -> None:
        super().__init__(f"{target}: step {step!r} failed: {message}\n{target}: {serving}")
        self.step = step


def release_name(label: str, now: float | None = None) -> str:
    """Sortable by time (UTC, to the millisecond), then what was deployed."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    label = "".join(c for c in label if releases.NAME.match(c))[:40]
    return f"{stamp}-{label}" if label else stamp


def git_label(root: str) -> str:
    """The checkout's short commit (+"-dirty" with uncommitted changes), "" without git."""
    if not os.path.isdir(os.path.join(root, ".git")):
        return ""
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("-dirty" if dirty else "")


@attrs.define
class Deployer:
    root: str  # the project being deployed (this machine)
    config: DeploymentConfig
    workers_dir: str  # relative to root
    release: str  # the name of the release this run creates (same on every target)
    workers: list[str] = attrs.field(factory=list)  # [] = the whole project
    dry_run: bool = False
    out: Callable[[str], None] = print
    _built: bool = False

    def say(self, target: TargetConfig, step: str, message: str) -> None:
        self.out(f"[{target.name}] {step}: {message}")

    # -- steps that run here -------------------------------------------------------------
    def hook(self, target: TargetConfig, name: str, previous: str | None) -> None:
        path = os.path.join(self.root, "bin", "hooks", name)
        if not os.path.exists(path):
            return
        if self.dry_run:
            self.say(target, name, f"would run bin/hooks/{name}")
            return
        if not os.access(path, os.X_OK):
            raise _Failed(name, f"bin/hooks/{name} is not executable (chmod +x)")
        env = dict(os.environ)
        env.update(
            TQSERVER_DEPLOY_TARGET=target.name,
            TQSERVER_DEPLOY_HOST=target.host,
            TQSERVER_DEPLOY_ROOT=target.root,
            TQSERVER_DEPLOY_RELEASE=self.release,
            TQSERVER_DEPLOY_PREVIOUS=previous or "",
            TQSERVER_DEPLOY_WORKERS=" ".join(self.workers),
        )
        self.say(target, name, f"bin/hooks/{name}")
        code = subprocess.run([path], cwd=self.root, env=env, stdin=subprocess.DEVNULL).returncode
        if code != 0:
            raise _Failed(name, f"bin/hooks/{name} exited with status {code}")

    def build_here(self, target: TargetConfig) -> None:
        """build: local — bin/build-prod once per run, before the first such target."""
        if self._built:
            return
        argv = [sys.executable, "-m", "tqserver.build", "--mode", "prod", "--root", self.root]
        if self.dry_run:
            self.say(target, "build", "would run bin/build-prod " + " ".join(self.workers))
            return
        self.say(target, "build", "bin/build-prod " + " ".join(self.workers))
        if subprocess.run(argv + self.workers, stdin=subprocess.DEVNULL).returncode != 0:
            raise _Failed("build", "bin/build-prod failed (its output is above)")
        self._built = True

    # -- one target ------------------------------------------------------------------------
    def connect(self, target: TargetConfig) -> tuple[Host, releases.State]:
        """The target's host and what its releases/ holds; StepFailed when unreachable."""
        host = Host(target)
        try:
            return host, releases.state(host)
        except ReleaseError as e:
            raise StepFailed(target.name, "connect", str(e), "nothing was changed") from None

    def deploy(self, target: TargetConfig) -> None:
        """Ship, switch, reload, wait; raises StepFailed saying what serves."""
        host, state = self.connect(target)
        previous = state.current
        unchanged = (
            f"nothing was changed: {previous} still serves"
            if previous
            else "nothing was changed (no release yet)"
        )
        try:
            if target.build == "local":
                self.build_here(target)
            self.hook(target, "pre-deploy", previous)
        except _Failed as e:
            raise StepFailed(target.name, e.step, e.message, unchanged) from None
        if self.dry_run:
            self.plan(host, state)
            return

        step = "prepare"
        try:
            path = releases.prepare(host, self.release, target.shared)
            self.say(
                target, step, f"releases/{self.release}" + (f" from {previous}" if previous else "")
            )
            step = "sync"
            self.sync(host, path)
            step = "revision"
            releases.write_revision(host, self.release)
            step = "activate"
            releases.activate(host, self.release)
            self.say(target, step, f"current -> releases/{self.release}")
        except (ReleaseError, _Failed) as e:
            self.discard(host)
            raise StepFailed(target.name, step, _message(e), unchanged) from None

        try:
            pid = releases.hangup(host, target.pidfile)
        except ReleaseError as e:
            raise StepFailed(target.name, "reload", str(e), self.revert(host, previous)) from None
        if pid is None:
            self.say(
                target,
                "reload",
                f"no server running ({target.pidfile}): the release is in place for its start",
            )
        else:
            self.say(target, "reload", f"SIGHUP to {pid}")
            try:
                seconds = wait_until_serving(
                    target.health_url, self.release, self.workers, target.health_timeout_seconds
                )
            except NotServing as e:
                raise StepFailed(
                    target.name, "health", str(e), self.revert(host, previous)
                ) from None
            self.say(target, "health", f"{self.release} serves ({seconds:.1f}s)")
        try:
            self.hook(target, "post-deploy", previous)
        except _Failed as e:
            raise StepFailed(target.name, e.step, e.message, f"{self.release} serves") from None
        self.prune(host)

    def sync(self, host: Host, path: str) -> None:
        argv = rsync_argv(self.root, host, path, self.workers_dir, self.workers)
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise _Failed("sync", (result.stderr or result.stdout).strip())
        self.say(host.target, "sync", f"rsync to {host.rsync_dest(path)}")

    def plan(self, host: Host, state: releases.State) -> None:
        """--dry-run: what would change against the current release, and the steps."""
        t = host.target
        dest = host.path("current") if state.current else None
        self.say(
            t,
            "prepare",
            f"would create releases/{self.release}"
            + (f" from {state.current}" if state.current else " (the first)"),
        )
        if dest:
            argv = rsync_argv(self.root, host, dest, self.workers_dir, self.workers, dry_run=True)
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            changes = [line for line in result.stdout.splitlines() if line.strip()]
            self.say(t, "sync", f"would change {len(changes)} path(s) of {state.current}")
            for line in changes:
                self.out(f"    {line}")
        else:
            self.say(t, "sync", f"would copy {self.root} (everything is new)")
        self.say(t, "activate", f"would point current at releases/{self.release}")
        self.say(t, "reload", f"would send SIGHUP to the pid in {t.pidfile}")
        self.say(t, "health", f"would wait for {t.health_url} to report {self.release}")
        self.hook(t, "post-deploy", state.current)

    def discard(self, host: Host) -> None:
        try:
            releases.remove(host, [self.release])
        except ReleaseError as e:
            self.say(host.target, "cleanup", str(e))

    def revert(self, host: Host, previous: str | None) -> str:
        """The new release does not serve: current back to ``previous``, the server told;
        returns what serves."""
        if previous is None:
            return "there is no previous release to go back to"
        try:
            releases.activate(host, previous)
            pid = releases.hangup(host, host.target.pidfile)
        except ReleaseError as e:
            return f"switching back to {previous} failed too: {e}"
        try:
            releases.mark_failed(host, self.release)
        except ReleaseError as e:
            self.say(host.target, "revert", str(e))
        self.say(host.target, "revert", f"current -> releases/{previous}")
        if pid is None:
            return f"current points to {previous} again"
        try:
            wait_until_serving(
                host.target.health_url, previous, self.workers, host.target.health_timeout_seconds
            )
        except NotServing as e:
            return f"current points to {previous} again, but it does not serve: {e}"
        return f"{previous} serves (current points to it again)"

    def prune(self, host: Host) -> None:
        try:
            old = releases.to_prune(releases.state(host), host.target.keep_releases)
            releases.remove(host, old)
        except ReleaseError as e:
            self.say(host.target, "prune", str(e))
            return
        if old:
            self.say(host.target, "prune", "removed " + ", ".join(old))

    # -- rollback ----------------------------------------------------------------------------
    def rollback(self, target: TargetConfig) -> None:
        host, state = self.connect(target)
        back = state.previous
        if back is None:
            raise StepFailed(
                target.name,
                "rollback",
                f"no release before {state.current or 'the current one'}",
                "nothing was changed",
            )
        if self.dry_run:
            self.say(
                target, "activate", f"would point current at releases/{back} (from {state.current})"
            )
            return
        try:
            releases.activate(host, back)
        except ReleaseError as e:
            raise StepFailed(
                target.name, "activate", str(e), f"{state.current} still serves"
            ) from None
        self.say(target, "activate", f"current -> releases/{back} (was {state.current})")
        try:
            pid = releases.hangup(host, target.pidfile)
        except ReleaseError as e:
            raise StepFailed(target.name, "reload", str(e), f"current points to {back}") from None
        if pid is None:
            self.say(target, "reload", f"no server running ({target.pidfile})")
            return
        self.say(target, "reload", f"SIGHUP to {pid}")
        try:
            seconds = wait_until_serving(target.health_url, back, [], target.health_timeout_seconds)
        except NotServing as e:
            raise StepFailed(target.name, "health", str(e), f"current points to {back}") from None
        self.say(target, "health", f"{back} serves ({seconds:.1f}s)")

    # -- several targets ---------------------------------------------------------------------
    def each(
        self, targets: list[TargetConfig], action: Callable[[TargetConfig], None], rolling: bool
    ) -> None:
        """One target after the other; with ``rolling`` and a balancer, each node drained
        first and put back once it serves. Stops at the first failure."""
        haproxy = self.config.balancer.haproxy if self.config.balancer.configured else None
        for target in targets:
            if not (rolling and haproxy):
                action(target)
                continue
            lb = HAProxy(haproxy.socket)
            server = target.balancer_server or target.name
            if self.dry_run:
                self.say(target, "drain", f"would drain {haproxy.backend}/{server}")
                action(target)
                self.say(target, "ready", f"would put {haproxy.backend}/{server} back")
                continue
            try:
                left = lb.drain(haproxy.backend, server, haproxy.drain_timeout_seconds)
            except BalancerError as e:
                raise StepFailed(target.name, "drain", str(e), "nothing was changed") from None
            self.say(
                target,
                "drain",
                f"{haproxy.backend}/{server} drained"
                + (f" ({left} session(s) still open after the timeout)" if left else ""),
            )
            try:
                action(target)
            except StepFailed:
                # What serves there now (the previous release) goes back into rotation.
                try:
                    lb.ready(haproxy.backend, server, haproxy.ready_timeout_seconds)
                    self.say(target, "ready", f"{haproxy.backend}/{server} is UP")
                except BalancerError as e:
                    self.say(target, "ready", f"{e} (the node stays out of rotation)")
                raise
            try:
                lb.ready(haproxy.backend, server, haproxy.ready_timeout_seconds)
            except BalancerError as e:
                raise StepFailed(
                    target.name, "ready", str(e), "the node is out of rotation"
                ) from None
            self.say(target, "ready", f"{haproxy.backend}/{server} is UP")


class _Failed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


def _message(e: Exception) -> str:
    return e.message if isinstance(e, _Failed) else str(e)
