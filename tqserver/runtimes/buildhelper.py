"""Small file jobs that belong *inside* a build, after the compiler succeeded: run as a
build step (a child process, like the compiler) so nothing touches the disk from the
reactor and a failed or cancelled build leaves nothing half-done.

    python buildhelper.py touch PATH
    python buildhelper.py stamp PATH TEXT
    python buildhelper.py install-jar SOURCE DEST [STAMP DIGEST]
    python buildhelper.py pyproject-requirements PYPROJECT OUT
    python buildhelper.py php-lint PHP FILE...

Standard library only: it runs as a script, without tqserver on the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Jars a build tool produces that are not the runnable application.
_NOT_RUNNABLE = ("-sources.jar", "-javadoc.jar", "-plain.jar", "-tests.jar", "-test.jar")
# Names of self-contained ("fat") jars: shadow, maven-assembly, maven-shade conventions.
_FAT_MARKERS = ("-all.jar", "-with-dependencies.jar", "-standalone.jar", "-fat.jar")


def touch(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a"):
        pass
    os.utime(path, None)


def stamp(path: str, text: str) -> None:
    """Write ``text`` to ``path`` by rename: a stamp is there whole or not at all."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w") as f:
        f.write(text + "\n")
    os.replace(partial, path)


def pyproject_requirements(pyproject: str, out: str) -> None:
    """[project].dependencies of a pyproject.toml as a requirements file, for pip (which,
    unlike uv, cannot install a project's dependencies without the project itself)."""
    try:
        import tomllib
    except ImportError:
        raise SystemExit(
            f"reading {pyproject} needs Python 3.11+ (tomllib) when uv is not installed: "
            "install uv (pip install uv), or list the dependencies in requirements.txt"
        ) from None
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f).get("project", {}).get("dependencies", [])
    stamp(out, "\n".join(deps))
    print(f"{pyproject}: {len(deps)} dependencies")


def pick_jar(directory: str) -> str | None:
    """The runnable jar a Gradle or Maven build left in ``directory``: a fat jar if there
    is one, else the newest ordinary jar."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".jar")]
    except OSError:
        return None
    names = [n for n in names if not n.endswith(_NOT_RUNNABLE) and not n.startswith("original-")]
    if not names:
        return None
    paths = [os.path.join(directory, n) for n in names]
    fat = [p for p in paths if p.endswith(_FAT_MARKERS)]
    return max(fat or paths, key=lambda p: (os.stat(p).st_mtime_ns, p))


def install_jar(
    source: str, dest: str, stamp_path: str | None = None, digest: str | None = None
) -> None:
    """Put the built jar at ``dest`` by rename, never by rewriting it in place: a running
    JVM keeps reading its own (old) jar lazily, and must not see a new one under it."""
    if os.path.isdir(source):
        found = pick_jar(source)
        if found is None:
            raise SystemExit(
                f"the build succeeded but left no runnable jar in {source}/ "
                "(make it produce one, e.g. a fat jar with shadowJar or "
                "maven-assembly)"
            )
        source = found
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    if os.path.dirname(os.path.abspath(source)) == os.path.dirname(os.path.abspath(dest)):
        os.replace(source, dest)
    else:
        partial = f"{dest}.{os.getpid()}.partial"
        shutil.copyfile(source, partial)
        os.replace(partial, dest)
    print(f"installed {os.path.relpath(source)} as {os.path.relpath(dest)}")
    if stamp_path is not None:
        stamp(stamp_path, digest or "")


def php_lint(php: str, files: list[str]) -> int:
    """``php -l`` on each file (PHP before 8.3 lints only the first file it is given);
    prints the errors, exit status 1 if any file has one."""
    bad = 0
    for path in files:
        run = subprocess.run([php, "-n", "-l", path], capture_output=True, text=True)
        if run.returncode != 0:
            bad += 1
            print((run.stdout + run.stderr).strip())
    print(f"php -l: {len(files) - bad} of {len(files)} files without syntax errors")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "touch":
        touch(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "stamp":
        stamp(argv[1], argv[2])
        return 0
    if len(argv) == 3 and argv[0] == "pyproject-requirements":
        pyproject_requirements(argv[1], argv[2])
        return 0
    if len(argv) in (3, 5) and argv[0] == "install-jar":
        install_jar(*argv[1:])
        return 0
    if len(argv) >= 2 and argv[0] == "php-lint":
        return php_lint(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
