"""The release directories on a target, as shell scripts the Host runs:

    <root>/releases/<name>/   one per deploy; REVISION holds <name>
    <root>/current            symlink to the release the server runs from
    <root>/shared/<path>      what every release shares (logs, run, ...): each release
                              has a symlink there instead

A new release starts as a copy of the current one (``cp -a``: what the target built —
workers/*/bin, node_modules, .venv — and the file times the server compares come along),
then rsync brings the changes. Switching is one rename of a symlink, so the server always
finds one whole release."""

from __future__ import annotations

import re

import attrs

from tqserver.deploy.host import Host
from tqserver.supervise.revision import FILE as REVISION_FILE

NAME = re.compile(r"^[A-Za-z0-9._:+@-]+$")  # what a REVISION line keeps (supervise.revision)


FAILED = ".failed"  # the suffix of a release that did not serve and was switched back from


class ReleaseError(Exception):
    """A command on the target failed; the message has its output."""


@attrs.frozen
class State:
    current: str | None  # the release name current points to
    releases: list[str]  # every release name, oldest first
    failed: list[str] = attrs.field(factory=list)  # releases switched back from (*.failed)

    @property
    def previous(self) -> str | None:
        """The newest release older than the current one (what --rollback goes back to)."""
        if self.current not in self.releases:
            return None
        older = self.releases[: self.releases.index(self.current)]
        return older[-1] if older else None


def _check(host: Host, what: str, script: str, *args: str) -> str:
    result = host.run(script, *args)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise ReleaseError(f"{what}: {detail}")
    return result.stdout


_STATE = r"""
root=$1
target=$(readlink "$root/current" 2>/dev/null || true)
echo "current=${target##*/}"
if [ -d "$root/releases" ]; then ls -1 "$root/releases"; fi
"""


def state(host: Host) -> State:
    out = _check(host, "reading the releases", _STATE, host.path()).splitlines()
    current = out[0].split("=", 1)[1] if out and out[0].startswith("current=") else ""
    names = sorted(n for n in out[1:] if NAME.match(n))
    good = [n for n in names if not n.endswith(FAILED)]
    return State(current or None, good, [n for n in names if n.endswith(FAILED)])


_PREPARE = r"""
set -e
root=$1; name=$2; shift 2
new="$root/releases/$name"
mkdir -p "$root/releases" "$root/shared"
if [ -e "$new" ]; then echo "release $name exists already" >&2; exit 1; fi
if [ -d "$root/current/" ]; then cp -a "$root/current/." "$new"; else mkdir "$new"; fi
for path in "$@"; do
    mkdir -p "$root/shared/$path" "$(dirname "$new/$path")"
    rm -rf "$new/$path"
    ln -s "$root/shared/$path" "$new/$path"
done
"""


def prepare(host: Host, name: str, shared: tuple[str, ...]) -> str:
    """Create releases/<name> as a copy of the current release, shared paths linked;
    returns its path."""
    _check(host, "creating the release", _PREPARE, host.path(), name, *shared)
    return host.path(f"releases/{name}")


_ACTIVATE = r"""
set -e
root=$1; name=$2
ln -sfn "releases/$name" "$root/current.new"
mv -T "$root/current.new" "$root/current"
"""


def write_revision(host: Host, name: str) -> None:
    _check(
        host,
        f"writing {REVISION_FILE}",
        'printf "%s\\n" "$2" > "$1"',
        host.path(f"releases/{name}/{REVISION_FILE}"),
        name,
    )


def activate(host: Host, name: str) -> None:
    """Point current at releases/<name> (one rename: never a missing current)."""
    _check(host, "switching current", _ACTIVATE, host.path(), name)


def remove(host: Host, names: list[str]) -> None:
    if names:
        paths = [host.path(f"releases/{n}") for n in names]
        _check(host, "removing releases", 'rm -rf -- "$@"', *paths)


def to_prune(state: State, keep: int) -> list[str]:
    """The oldest releases beyond ``keep``, never the current one or the one before it;
    failed releases but the last (kept to look at)."""
    spare = {state.current, state.previous}
    surplus = len(state.releases) - keep
    return [n for n in state.releases if n not in spare][: max(surplus, 0)] + state.failed[:-1]


def mark_failed(host: Host, name: str) -> None:
    """Rename a release that did not serve (running processes keep their directory), so
    --rollback never goes back to it."""
    old = host.path(f"releases/{name}")
    _check(host, "marking the release failed", 'mv -T -- "$1" "$2"', old, old + FAILED)


_HUP = r"""
pidfile=$1
if [ ! -s "$pidfile" ]; then echo "none: no pidfile $pidfile"; exit 0; fi
pid=$(cat "$pidfile")
if ! kill -0 "$pid" 2>/dev/null; then echo "none: no process $pid (stale $pidfile)"; exit 0; fi
kill -HUP "$pid"
echo "hup: $pid"
"""


def hangup(host: Host, pidfile: str) -> str | None:
    """SIGHUP to the server named by its pidfile: the pid, or None when no server runs
    (the release is then in place for its start)."""
    out = _check(host, "sending SIGHUP", _HUP, host.path(pidfile)).strip()
    return out.split(": ", 1)[1] if out.startswith("hup: ") else None
