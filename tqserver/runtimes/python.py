"""Python workers: a script (``python.entrypoint``, default src/main.py) that calls
``tqserver.worker.serve()``, or an application object (``python.app``) that
tqserver.worker imports and serves itself (WSGI on its own server, ASGI on uvicorn).

They run on the supervisor's interpreter, on ``python.interpreter``, or, when the worker
declares dependencies in requirements.txt or pyproject.toml, in its own
``workers/<name>/.venv``. The build step creates that venv with the chosen interpreter
and installs the dependencies (with uv, else ``python -m venv`` and pip), only when the
manifest or the interpreter changed since the last successful install: a stamp in the
venv holds what it was installed from, so deciding reads two small files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import (
    HELPER,
    BuildStep,
    Runtime,
    ToolchainMissing,
    helper_step,
    worker_files,
)

VENV = ".venv"
STAMP = os.path.join(VENV, ".tqserver-installed")
MANIFESTS = ("requirements.txt", "pyproject.toml")  # the first found is installed
ASGI_SERVER = "uvicorn"  # installed along with a python.app worker's dependencies
# Only tqserver.worker, not the directory TQServer is installed in (see there).
WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pythonpath")


def find_uv() -> str | None:
    """uv as installed with TQServer (next to its interpreter), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("uv")


class PythonRuntime(Runtime):
    type = "python"

    def entrypoint(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, spec.config.python.entrypoint)

    def interpreter(self, spec: WorkerSpec) -> str:
        """The interpreter python.interpreter names (a command on PATH or a path, relative
        to the worker), or the supervisor's own."""
        name = spec.config.python.interpreter
        if not name:
            return sys.executable
        if os.sep in name:
            path = name if os.path.isabs(name) else os.path.join(spec.directory, name)
            if os.access(path, os.X_OK) and not os.path.isdir(path):
                return path
            raise ToolchainMissing(
                f"python.interpreter {name!r}: {path} does not exist or is not executable"
            )
        found = shutil.which(name, path=spec.config.env.get("PATH", os.environ.get("PATH")))
        if found is None:
            raise ToolchainMissing(
                f"python.interpreter {name!r} is not installed (not on PATH): install it "
                "(e.g. apt-get install python3.12 or pypy3) or give its path"
            )
        return found

    def manifest(self, spec: WorkerSpec) -> str | None:
        for name in MANIFESTS:
            path = os.path.join(spec.directory, name)
            if os.path.isfile(path):
                return path
        return None

    def venv(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, VENV)

    def outputs(self, spec: WorkerSpec) -> list[str]:
        """The venv's python, when there are dependencies to install."""
        return [self.python(spec)] if self.manifest(spec) is not None else []

    def python(self, spec: WorkerSpec) -> str:
        """What runs the worker: its venv's python when it has dependencies."""
        if self.manifest(spec) is not None:
            return os.path.join(self.venv(spec), "bin", "python")
        return self.interpreter(spec)

    def extra_packages(self, spec: WorkerSpec) -> list[str]:
        return [ASGI_SERVER] if spec.config.python.app else []

    def install_state(self, spec: WorkerSpec, interpreter: str, manifest: str) -> str:
        """What an install is made from: the interpreter, and a digest of the manifest's
        name and content and the extra packages. The stamp holds it."""
        digest = hashlib.sha1(os.path.basename(manifest).encode() + b"\0")
        with open(manifest, "rb") as f:
            digest.update(f.read())
        digest.update(b"\0" + " ".join(self.extra_packages(spec)).encode())
        return f"{os.path.realpath(interpreter)}\n{digest.hexdigest()}"

    def _stamped(self, spec: WorkerSpec) -> str | None:
        try:
            with open(os.path.join(spec.directory, STAMP)) as f:
                return f.read().strip()
        except OSError:
            return None

    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        interpreter = self.interpreter(spec)  # checked even with nothing to install
        manifest = self.manifest(spec)
        if manifest is None:
            return []
        state = self.install_state(spec, interpreter, manifest)
        stamped = self._stamped(spec)
        venv = self.venv(spec)
        venv_python = os.path.join(venv, "bin", "python")
        has_venv = os.path.exists(venv_python)
        if stamped == state and has_venv:
            return []
        # A venv of another interpreter is made anew; one made by hand (no stamp) is kept.
        fresh = not has_venv or (
            stamped is not None and stamped.split("\n", 1)[0] != os.path.realpath(interpreter)
        )
        d = spec.directory
        extras = self.extra_packages(spec)
        uv = find_uv()
        steps = []
        if uv is not None:
            env = {"UV_PYTHON_DOWNLOADS": "never", "VIRTUAL_ENV": venv}
            if fresh:
                steps.append(
                    BuildStep([uv, "venv", "--clear", "--python", interpreter, venv], d, env)
                )
            # Bytecode compiled at install time, as pip does: the first start after an
            # install does not compile the dependencies' modules.
            install = [uv, "pip", "install", "--compile-bytecode", "--python", venv_python]
            steps.append(BuildStep([*install, "-r", manifest, *extras], d, env))
        else:
            if fresh:
                steps.append(BuildStep([interpreter, "-m", "venv", "--clear", venv], d))
            if manifest.endswith(".toml"):
                listed = os.path.join(venv, ".tqserver-requirements.txt")
                steps.append(
                    BuildStep([venv_python, HELPER, "pyproject-requirements", manifest, listed], d)
                )
                manifest = listed
            pip = [venv_python, "-m", "pip", "install", "--disable-pip-version-check"]
            steps.append(BuildStep([*pip, "-r", manifest, *extras], d))
        steps.append(helper_step(d, "stamp", os.path.join(d, STAMP), state))
        return steps

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        if spec.config.python.app:
            return [self.python(spec), "-m", "tqserver.worker", spec.config.python.app]
        return [self.python(spec), self.entrypoint(spec)]

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        return worker_files(spec)

    def env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        path = WORKER_PATH
        inherited = os.environ.get("PYTHONPATH")
        own = self.manifest(spec) is None and not spec.config.python.interpreter
        if inherited and own:  # the supervisor's interpreter: its PYTHONPATH fits it
            path += os.pathsep + inherited
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        if self.manifest(spec) is not None:
            venv = self.venv(spec)
            env["VIRTUAL_ENV"] = venv
            env["PATH"] = os.path.join(venv, "bin") + os.pathsep + os.environ.get("PATH", "")
        return env
