"""etc/deployment.yaml: where bin/deploy sends a release (local directories or hosts over
ssh), how the target gets its build output, the health URL that says the release serves,
and the load balancer a rolling deploy drains nodes through. Checked by the same walker as
server.yaml, so every error names file:line:column and the dotted key."""

from __future__ import annotations

import os
import re

import attrs

from tqserver.config.errors import ConfigError, ConfigWarning
from tqserver.config.fields import (
    Position,
    _as_mapping,
    _build,
    _choice,
    _describe,
    _f,
    _float,
    _int,
    _item_pos,
    _key_pos,
    _load,
    _positions,
    _str,
    _str_list,
    _sub,
    _value_pos,
    _walk,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@attrs.frozen
class SshSection:
    user: str = _f("", _str())  # "": ssh's own default (the local user, ~/.ssh/config)
    port: int = _f(22, _int(1, 65535))
    identity_file: str = _f("", _str())
    options: tuple[str, ...] = _f((), _str_list())  # extra ssh arguments, e.g. ["-o", "..."]


@attrs.frozen
class TargetConfig:
    # "": the root is a directory on this machine; else the host ssh and rsync reach.
    host: str = _f("", _str())
    root: str = _f("", _str())  # releases/, current, shared/ live here
    ssh: SshSection = _sub(SshSection)
    # target: sources are shipped and the server builds them on the HUP (its own Go, bun
    # install, venvs); local: bin/build-prod runs here first and workers/*/bin/ is shipped.
    build: str = _f("target", _choice("target", "local"))
    health_url: str = _f("", _str())  # e.g. http://10.0.0.5:8080/health
    health_timeout_seconds: float = _f(180.0, _float())
    pidfile: str = _f("shared/run/tqserver.pid", _str())  # relative to root, or absolute
    keep_releases: int = _f(5, _int(2))
    # Directories every release shares (symlinks into shared/): what the server writes.
    shared: tuple[str, ...] = _f(("logs", "run"), _str_list())
    exclude: tuple[str, ...] = _f((), _str_list())  # more rsync --exclude patterns
    balancer_server: str = _f("", _str())  # its name in the HAProxy backend (default: the target's)
    name: str = attrs.field(default="")


@attrs.frozen
class HAProxySection:
    socket: str = _f("", _str())  # its stats socket (level admin): a path, or host:port
    backend: str = _f("", _str())
    drain_timeout_seconds: float = _f(30.0, _float())  # until no session is left on the node
    ready_timeout_seconds: float = _f(30.0, _float())  # until its health check says UP again


@attrs.frozen
class BalancerSection:
    haproxy: HAProxySection = _sub(HAProxySection)

    @property
    def configured(self) -> bool:
        return bool(self.haproxy.socket)


@attrs.frozen
class DeploymentConfig:
    targets: dict[str, TargetConfig] = attrs.field(factory=dict)
    groups: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    balancer: BalancerSection = _sub(BalancerSection)
    source: str = attrs.field(default="")
    positions: dict[str, Position] = _positions()

    def resolve(self, names: str) -> list[TargetConfig]:
        """The targets a command line names: a target, a group, or a comma-separated list
        of either, in order; raises KeyError naming what is unknown."""
        chosen: list[TargetConfig] = []
        for name in [n for n in names.split(",") if n]:
            if name in self.targets:
                members: tuple[str, ...] = (name,)
            elif name in self.groups:
                members = self.groups[name]
            else:
                raise KeyError(name)
            chosen += [self.targets[m] for m in members if self.targets[m] not in chosen]
        return chosen


def _check_name(kind: str, name, ctx, key: str, pos: Position) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ctx.error(
            key, pos, f"a {kind} name has letters, digits, '.', '_' and '-', got {_describe(name)}"
        )
    return name


def _target(name: str, node, ctx, pos: Position, base: str) -> TargetConfig:
    key = f"targets.{name}"
    mapping = _as_mapping(node, ctx, key, pos)
    target = _build(TargetConfig, mapping, ctx, key + ".", name=name)
    if not target.root:
        raise ctx.error(key, pos, "root is required: the directory that holds the releases")
    if target.host and not target.root.startswith("/"):
        raise ctx.error(
            f"{key}.root", ctx.positions[f"{key}.root"], "must be an absolute path on the host"
        )
    if not target.host and not os.path.isabs(target.root):
        target = attrs.evolve(target, root=os.path.normpath(os.path.join(base, target.root)))
    if not target.health_url:
        raise ctx.error(
            key, pos, "health_url is required: the /health URL that says the release serves"
        )
    if not re.match(r"^https?://", target.health_url):
        raise ctx.error(
            f"{key}.health_url",
            ctx.positions[f"{key}.health_url"],
            f"expected an http:// or https:// URL, got {target.health_url!r}",
        )
    for i, path in enumerate(target.shared):
        if path.startswith("/") or ".." in path.split("/") or not path.strip("/"):
            raise ctx.error(
                f"{key}.shared[{i}]",
                ctx.positions.get(f"{key}.shared", pos),
                f"must be a path inside the release, got {path!r}",
            )
    return target


def load_deployment_config(path: str, root: str) -> tuple[DeploymentConfig, list[ConfigWarning]]:
    """Read etc/deployment.yaml (local roots relative to the project ``root``); raises
    ConfigError, returns the unknown-key warnings."""
    ctx, top = _load(path)
    targets_node = _as_mapping(top.get("targets"), ctx, "targets", _value_pos(top, "targets"))
    if not targets_node:
        raise ctx.error("targets", _key_pos(top, "targets"), "no target defined")
    targets = {}
    for name, node in targets_node.items():
        pos = _key_pos(targets_node, name)
        _check_name("target", name, ctx, f"targets.{name}", pos)
        targets[name] = _target(name, node, ctx, pos, root)
    groups_node = _as_mapping(top.get("groups"), ctx, "groups", _value_pos(top, "groups"))
    groups: dict[str, tuple[str, ...]] = {}
    for name, node in groups_node.items():
        key = f"groups.{name}"
        pos = _key_pos(groups_node, name)
        _check_name("group", name, ctx, key, pos)
        if name in targets:
            raise ctx.error(key, pos, f"{name!r} is a target's name too")
        members = _str_list()(node, ctx, key, _value_pos(groups_node, name, pos))
        if not members:
            raise ctx.error(key, pos, "a group needs at least one target")
        for i, member in enumerate(members):
            if member not in targets:
                raise ctx.error(
                    f"{key}[{i}]", _item_pos(node, i, pos), f"no target named {member!r}"
                )
        groups[name] = members
    values = _walk(DeploymentConfig, top, ctx, "", ignore=("targets", "groups"))
    config = DeploymentConfig(
        targets=targets, groups=groups, source=path, positions=ctx.positions, **values
    )
    if config.balancer.configured and not config.balancer.haproxy.backend:
        raise ctx.error(
            "balancer.haproxy", _key_pos(top, "balancer"), "backend is required with a socket"
        )
    return config, ctx.sorted_warnings()


__all__ = [
    "BalancerSection",
    "ConfigError",
    "DeploymentConfig",
    "HAProxySection",
    "SshSection",
    "TargetConfig",
    "load_deployment_config",
]
