"""Runtimes without running their toolchains: argv, environment, build steps, when a build
is skipped, and what a missing toolchain says. Mtimes are set, never waited for."""
from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import time
from typing import Optional

import attrs
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tqserver import runtimes
from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import default_server_config
from tqserver.config.worker import default_worker_config
from tqserver.runtimes import CannotBuild, ToolchainMissing, buildhelper, runtime_for
from tqserver.runtimes.bun import BunRuntime, _npmrc_prefix, npm_global_bins
from tqserver.runtimes.command import CommandRuntime
from tqserver.runtimes.kotlin import KotlinRuntime
from tqserver.supervise.build import run_build
from tqserver.supervise.fingerprint import Fingerprint
from tqserver.supervise.pool import PoolContext, WorkerPool
from tqserver.supervise.ports import PortPool

from .fakes import FakeProcessReactor, ScriptedProbe

T0 = 1_700_000_000 * 10**9     # a fixed mtime (ns) to count from


def write(path: str, text: str = "", mtime_ns: Optional[int] = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def executable(path: str) -> str:
    write(path, "#!/bin/sh\nexit 0\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


class SpecMixin:
    def make_spec(self, type_: str, name: str = "app", **config) -> WorkerSpec:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cfg = attrs.evolve(default_worker_config(), type=type_, **config)
        return WorkerSpec(name=name, directory=directory, route="/" + name, type=type_,
                          config=cfg, config_file=None)


class RegistryTests(unittest.TestCase):
    def test_each_type_has_its_runtime(self) -> None:
        for type_, cls in [("bun", BunRuntime), ("kotlin", KotlinRuntime),
                           ("command", CommandRuntime)]:
            runtime = runtime_for(type_)
            self.assertIsInstance(runtime, cls)
            self.assertEqual(runtime.type, type_)
        self.assertEqual(runtime_for("go").type, "go")
        self.assertEqual(runtime_for("python").type, "python")

    def test_unknown_type_says_so(self) -> None:
        e = self.assertRaises(ToolchainMissing, runtime_for, "cobol")
        self.assertIn("'cobol' runtime is not supported", str(e))


# ---------------------------------------------------------------------------------- Bun

class BunTests(SpecMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.bun = executable(os.path.abspath(self.mktemp()) + "/bin/bun")
        self.patch(runtimes.bun, "find_tool", lambda name, *fallbacks: self.bun)
        self.runtime = BunRuntime()

    def bun_spec(self, **bun) -> WorkerSpec:
        spec = self.make_spec("bun", "api")
        if bun:
            spec = attrs.evolve(spec, config=attrs.evolve(
                spec.config, bun=attrs.evolve(spec.config.bun, **bun)))
        return spec

    def installed(self, spec: WorkerSpec, stamp_ns: int) -> None:
        """node_modules as a successful dev install leaves it, its stamp written at stamp_ns."""
        write(os.path.join(spec.directory, "node_modules", ".tqserver-installed"),
              "development\n", stamp_ns)

    def test_run_argv_and_env(self) -> None:
        spec = self.bun_spec(entrypoint="src/server.ts", env={"NODE_ENV": "production"})
        self.assertEqual(self.runtime.run_argv(spec, 9001),
                         [self.bun, "run", os.path.join(spec.directory, "src/server.ts")])
        self.assertEqual(self.runtime.env(spec, 9001), {"NODE_ENV": "production"})

    def test_default_entrypoint_is_index_ts(self) -> None:
        spec = self.bun_spec()
        self.assertEqual(self.runtime.run_argv(spec, 1)[-1],
                         os.path.join(spec.directory, "index.ts"))

    def test_no_package_json_nothing_to_install(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "index.ts"), "")
        self.assertFalse(self.runtime.install_needed(spec))
        self.assertEqual(self.runtime.build_steps(spec), [])

    def test_first_build_installs_then_stamps(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        steps = self.runtime.build_steps(spec)
        self.assertEqual([s.argv for s in steps[:1]], [[self.bun, "install"]])
        self.assertEqual(steps[0].cwd, spec.directory)
        stamp = os.path.join(spec.directory, "node_modules", ".tqserver-installed")
        self.assertEqual(steps[1].argv[-3:], ["stamp", stamp, "development"])
        # The stamp step is the real helper: run it the way the build would.
        self.assertEqual(buildhelper.main(steps[1].argv[2:]), 0)
        self.assertTrue(os.path.exists(stamp))
        self.assertEqual(self.runtime.build_steps(spec), [])

    def test_prod_installs_without_dev_dependencies_and_a_dev_install_does_not_count(self):
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        self.installed(spec, T0 + 1)
        self.assertEqual(self.runtime.build_steps(spec, "dev"), [])
        install, stamp = self.runtime.build_steps(spec, "prod")
        self.assertEqual(install.argv, [self.bun, "install", "--production"])
        self.assertEqual(buildhelper.main(stamp.argv[2:]), 0)
        self.assertEqual(self.runtime.build_steps(spec, "prod"), [])
        self.assertEqual(self.runtime.build_steps(spec, "dev")[0].argv, [self.bun, "install"])

    def test_a_stamp_from_before_modes_were_recorded_installs_once(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        write(os.path.join(spec.directory, "node_modules", ".tqserver-installed"), "", T0 + 1)
        self.assertTrue(self.runtime.install_needed(spec))

    def test_unchanged_package_json_and_lockfile_skip_install(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        write(os.path.join(spec.directory, "bun.lock"), "{}", T0 + 1)
        self.installed(spec, T0 + 2)
        self.assertFalse(self.runtime.install_needed(spec))
        self.assertEqual(self.runtime.build_steps(spec), [])

    def test_changed_package_json_installs(self) -> None:
        spec = self.bun_spec()
        self.installed(spec, T0)
        write(os.path.join(spec.directory, "package.json"), "{}", T0 + 10**9)
        self.assertTrue(self.runtime.install_needed(spec))
        self.assertEqual(self.runtime.build_steps(spec)[0].argv, [self.bun, "install"])

    def test_changed_lockfile_installs(self) -> None:
        for lockfile in ("bun.lock", "bun.lockb"):
            spec = self.bun_spec()
            write(os.path.join(spec.directory, "package.json"), "{}", T0)
            self.installed(spec, T0 + 1)
            self.assertFalse(self.runtime.install_needed(spec), lockfile)
            write(os.path.join(spec.directory, lockfile), "", T0 + 2)
            self.assertTrue(self.runtime.install_needed(spec), lockfile)

    def test_same_tick_as_the_stamp_counts_as_changed(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        self.installed(spec, T0)
        self.assertTrue(self.runtime.install_needed(spec))

    def test_missing_node_modules_or_stamp_installs(self) -> None:
        spec = self.bun_spec()
        write(os.path.join(spec.directory, "package.json"), "{}", T0)
        self.assertTrue(self.runtime.install_needed(spec))          # no node_modules
        os.makedirs(os.path.join(spec.directory, "node_modules"))
        self.assertTrue(self.runtime.install_needed(spec))          # no stamp
        self.installed(spec, T0 + 1)
        self.assertFalse(self.runtime.install_needed(spec))
        shutil.rmtree(os.path.join(spec.directory, "node_modules"))
        self.assertTrue(self.runtime.install_needed(spec))          # deleted by the user

    def test_build_inputs(self) -> None:
        spec = self.bun_spec()
        d = spec.directory
        for rel in ("index.ts", "lib/db.ts", "lib/util.js", "package.json", "README.md",
                    "node_modules/dep/index.ts", "lib/node_modules/x.ts", "public/app.js"):
            write(os.path.join(d, rel))
        inputs = self.runtime.build_inputs(spec)
        for rel in ("index.ts", "lib/db.ts", "lib/util.js", "package.json", "bun.lock",
                    "bun.lockb"):
            self.assertIn(os.path.join(d, rel), inputs)
        for rel in ("README.md", "node_modules/dep/index.ts", "lib/node_modules/x.ts",
                    "public/app.js"):
            self.assertNotIn(os.path.join(d, rel), inputs)


class BunToolchainTests(SpecMixin, unittest.TestCase):
    def test_missing_bun_says_what_to_install(self) -> None:
        self.patch(runtimes.bun, "find_tool", lambda name, *fallbacks: None)
        spec = self.make_spec("bun")
        e = self.assertRaises(ToolchainMissing, BunRuntime().build_steps, spec)
        self.assertIn("install Bun: npm install -g bun (or bin/install-toolchains --only bun)",
                      str(e))
        self.assertRaises(ToolchainMissing, BunRuntime().run_argv, spec, 9000)

    def test_found_in_npm_global_bin_when_not_on_path(self) -> None:
        prefix = os.path.abspath(self.mktemp())
        bun = executable(os.path.join(prefix, "bin", "bun"))
        self.patch(shutil, "which", lambda *a, **kw: None)
        self.patch(os, "environ", dict(os.environ, NPM_CONFIG_PREFIX=prefix))
        self.assertEqual(BunRuntime().bun(), bun)

    def test_npm_global_bins_include_npmrc_prefix_and_node_dir(self) -> None:
        home = os.path.abspath(self.mktemp())
        write(os.path.join(home, ".npmrc"), "fund=false\nprefix = ~/.npm-packages\n")
        node = executable(os.path.join(home, "node", "bin", "node"))
        self.patch(os, "environ", {"HOME": home, "PATH": os.path.dirname(node)})
        bins = npm_global_bins()
        self.assertIn(os.path.join(home, ".npm-packages", "bin"), bins)
        self.assertIn(os.path.dirname(node), bins)
        self.assertIn(os.path.join(home, ".bun", "bin"), bins)
        self.assertIsNone(_npmrc_prefix(os.path.join(home, "missing")))


# ------------------------------------------------------------------------------- Kotlin

class KotlinTests(SpecMixin, unittest.TestCase):
    def setUp(self) -> None:
        tools = os.path.abspath(self.mktemp())
        self.java = executable(os.path.join(tools, "java"))
        self.kotlinc = executable(os.path.join(tools, "kotlinc"))
        self.tools = {"java": self.java, "kotlinc": self.kotlinc}
        self.patch(runtimes.kotlin, "find_tool",
                   lambda name, *fallbacks: self.tools.get(name))
        self.runtime = KotlinRuntime()

    def kotlin_spec(self, name: str = "svc", **kotlin) -> WorkerSpec:
        spec = self.make_spec("kotlin", name)
        if kotlin:
            spec = attrs.evolve(spec, config=attrs.evolve(
                spec.config, kotlin=attrs.evolve(spec.config.kotlin, **kotlin)))
        return spec

    def run_install_step(self, step) -> None:
        """Run the install-jar helper step in-process, from its cwd, as the build would."""
        self.patch(sys, "stdout", io.StringIO())
        cwd = os.getcwd()
        os.chdir(step.cwd)
        try:
            self.assertEqual(buildhelper.main(step.argv[2:]), 0)
        finally:
            os.chdir(cwd)

    def test_build_kind_from_build_files(self) -> None:
        for files, kind in [((), "kotlinc"), (("build.gradle.kts",), "gradle"),
                            (("build.gradle",), "gradle"), (("pom.xml",), "maven"),
                            (("pom.xml", "build.gradle"), "gradle")]:
            spec = self.kotlin_spec()
            write(os.path.join(spec.directory, "src", "Main.kt"), "fun main() {}")
            for name in files:
                write(os.path.join(spec.directory, name))
            self.assertEqual(self.runtime.build_kind(spec), kind, files)

    def test_kotlinc_compiles_every_source_to_a_temp_jar_then_installs_it(self) -> None:
        spec = self.kotlin_spec("api/v1/users")
        d = spec.directory
        write(os.path.join(d, "src", "Main.kt"), "fun main() {}")
        write(os.path.join(d, "src", "model", "Item.kt"), "class Item")
        write(os.path.join(d, "src", "notes.txt"), "")
        compile_, install = self.runtime.build_steps(spec)
        self.assertEqual(compile_.argv, [self.kotlinc, "src/Main.kt", "src/model/Item.kt",
                                         "-include-runtime", "-d", "bin/.users.building.jar"])
        self.assertEqual(compile_.cwd, d)
        self.assertEqual(install.argv[:2], [sys.executable, buildhelper.__file__])
        self.assertEqual(install.argv[2:5], ["install-jar", "bin/.users.building.jar",
                                             os.path.join(d, "bin", "users.jar")])
        self.assertEqual(self.runtime.artifact(spec), os.path.join(d, "bin", "users.jar"))

    def test_unchanged_sources_are_not_recompiled(self) -> None:
        spec = self.kotlin_spec()
        d = spec.directory
        write(os.path.join(d, "src", "Main.kt"), "fun main() {}", T0)
        steps = self.runtime.build_steps(spec)
        write(os.path.join(d, "bin", ".svc.building.jar"), "jar v1")   # what kotlinc made
        self.run_install_step(steps[-1])
        self.assertEqual(self.runtime.build_steps(spec), [])

        write(os.path.join(d, "src", "Main.kt"), "fun main() {}", T0 + 1)   # touched
        self.assertEqual(len(self.runtime.build_steps(spec)), 2)
        write(os.path.join(d, "src", "Main.kt"), "fun main() {}", T0)      # back again
        self.assertEqual(self.runtime.build_steps(spec), [])
        write(os.path.join(d, "src", "Extra.kt"), "class Extra", T0)       # a new file
        self.assertEqual(len(self.runtime.build_steps(spec)), 2)
        os.remove(os.path.join(d, "src", "Extra.kt"))
        self.assertEqual(self.runtime.build_steps(spec), [])
        os.remove(self.runtime.artifact(spec))                             # jar deleted
        self.assertEqual(len(self.runtime.build_steps(spec)), 2)

    def test_gradle_prefers_its_wrapper(self) -> None:
        spec = self.kotlin_spec()
        d = spec.directory
        write(os.path.join(d, "build.gradle.kts"))
        self.tools["gradle"] = executable(os.path.join(self.mktemp(), "gradle"))
        build, install = self.runtime.build_steps(spec)
        self.assertEqual(build.argv, [self.tools["gradle"], "build", "--no-daemon",
                                      "--console=plain"])
        self.assertEqual(install.argv[3:5], [os.path.join(d, "build", "libs"),
                                             os.path.join(d, "bin", "svc.jar")])
        gradlew = write(os.path.join(d, "gradlew"), "#!/bin/sh\n")
        self.assertEqual(self.runtime.build_steps(spec)[0].argv[:2], ["/bin/sh", gradlew])
        os.chmod(gradlew, 0o755)
        self.assertEqual(self.runtime.build_steps(spec)[0].argv[:2], [gradlew, "build"])

    def test_maven(self) -> None:
        spec = self.kotlin_spec()
        d = spec.directory
        write(os.path.join(d, "pom.xml"))
        self.tools["mvn"] = executable(os.path.join(self.mktemp(), "mvn"))
        build, install = self.runtime.build_steps(spec)
        self.assertEqual(build.argv, [self.tools["mvn"], "-q", "-B", "package"])
        self.assertEqual(install.argv[3], os.path.join(d, "target"))
        mvnw = executable(os.path.join(d, "mvnw"))
        self.assertEqual(self.runtime.build_steps(spec)[0].argv[0], mvnw)

    def test_build_inputs_cover_sources_and_build_files(self) -> None:
        spec = self.kotlin_spec()
        inputs = self.runtime.build_inputs(spec)
        for rel in ("src", "build.gradle.kts", "build.gradle", "settings.gradle.kts",
                    "pom.xml", "gradle.properties"):
            self.assertIn(os.path.join(spec.directory, rel), inputs)

    def test_run_argv(self) -> None:
        spec = self.kotlin_spec(jvm_args=("-Xmx64m", "-XX:+UseSerialGC"))
        jar = os.path.join(spec.directory, "bin", "svc.jar")
        self.assertEqual(self.runtime.run_argv(spec, 9000),
                         [self.java, "-Xmx64m", "-XX:+UseSerialGC", "-jar", jar])
        spec = self.kotlin_spec(main_class="com.example.ServerKt")
        jar = os.path.join(spec.directory, "bin", "svc.jar")
        self.assertEqual(self.runtime.run_argv(spec, 9000),
                         [self.java, "-cp", jar, "com.example.ServerKt"])

    def test_no_sources(self) -> None:
        spec = self.kotlin_spec()
        e = self.assertRaises(CannotBuild, self.runtime.build_steps, spec)
        self.assertIn("no Kotlin sources", str(e))
        write(self.runtime.artifact(spec), "a deployed jar")
        self.assertEqual(self.runtime.build_steps(spec), [])

    def test_missing_toolchains_say_what_to_install(self) -> None:
        spec = self.kotlin_spec()
        write(os.path.join(spec.directory, "src", "Main.kt"), "fun main() {}")
        del self.tools["kotlinc"]
        e = self.assertRaises(ToolchainMissing, self.runtime.build_steps, spec)
        self.assertIn("bin/install-toolchains --only kotlin", str(e))
        del self.tools["java"]
        e = self.assertRaises(ToolchainMissing, self.runtime.build_steps, spec)
        self.assertIn("install a JDK", str(e))
        self.assertRaises(ToolchainMissing, self.runtime.run_argv, spec, 9000)
        write(os.path.join(spec.directory, "build.gradle"))
        self.tools["java"] = self.java
        e = self.assertRaises(ToolchainMissing, self.runtime.build_steps, spec)
        self.assertIn("Gradle is not installed and the worker has no gradlew", str(e))
        os.remove(os.path.join(spec.directory, "build.gradle"))
        write(os.path.join(spec.directory, "pom.xml"))
        e = self.assertRaises(ToolchainMissing, self.runtime.build_steps, spec)
        self.assertIn("Maven is not installed", str(e))


class KotlinBuildChainTests(SpecMixin, unittest.TestCase):
    """The steps run for real (build.run_build, the helper as a script) with a stand-in
    kotlinc that fails on a source containing "broken" and otherwise writes the -d jar."""

    def setUp(self) -> None:
        tools = os.path.abspath(self.mktemp())
        kotlinc = write(os.path.join(tools, "kotlinc"), "\n".join([
            "#!/bin/sh",
            'if grep -q broken "$1"; then echo "$1:1:1: error: broken source" >&2; exit 1; fi',
            'for out; do :; done',
            'mkdir -p "$(dirname "$out")" && cat "$1" > "$out"', ""]))   # as kotlinc does
        os.chmod(kotlinc, 0o755)
        tools_by_name = {"java": kotlinc, "kotlinc": kotlinc}
        self.patch(runtimes.kotlin, "find_tool", lambda name, *f: tools_by_name.get(name))
        self.runtime = KotlinRuntime()
        self.spec = self.make_spec("kotlin", "svc")
        self.source = os.path.join(self.spec.directory, "src", "Main.kt")
        self.jar = self.runtime.artifact(self.spec)

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    @defer.inlineCallbacks
    def test_success_installs_and_stamps_failure_changes_nothing(self):
        write(self.source, "v1", T0)
        result = yield run_build(reactor, self.runtime.build_steps(self.spec))
        self.assertTrue(result.ok, result.output)
        self.assertEqual(self.read(self.jar), "v1")
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.jar))),
                         [".svc.jar.inputs", "svc.jar"])        # the temp jar was moved
        self.assertEqual(self.runtime.build_steps(self.spec), [])

        write(self.source, "broken", T0 + 1)
        stamp = self.read(self.runtime.stamp(self.spec))
        result = yield run_build(reactor, self.runtime.build_steps(self.spec))
        self.assertFalse(result.ok)
        self.assertIn("src/Main.kt:1:1: error: broken source", result.output)
        self.assertEqual(self.read(self.jar), "v1")                 # the old jar serves on
        self.assertEqual(self.read(self.runtime.stamp(self.spec)), stamp)
        self.assertEqual(len(self.runtime.build_steps(self.spec)), 2)   # still to build

        write(self.source, "v2", T0 + 2)
        result = yield run_build(reactor, self.runtime.build_steps(self.spec))
        self.assertTrue(result.ok, result.output)
        self.assertEqual(self.read(self.jar), "v2")
        self.assertEqual(self.runtime.build_steps(self.spec), [])


class InstallJarTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.out)
    def test_picks_the_runnable_jar(self) -> None:
        d = os.path.abspath(self.mktemp())
        for name, ns in [("app-1.0-sources.jar", T0 + 9), ("app-1.0-javadoc.jar", T0 + 9),
                         ("app-1.0-plain.jar", T0 + 9), ("original-app-1.0.jar", T0 + 9),
                         ("app-1.0.jar", T0 + 1), ("app-0.9.jar", T0), ("notes.txt", T0 + 9)]:
            write(os.path.join(d, name), name, ns)
        self.assertEqual(buildhelper.pick_jar(d), os.path.join(d, "app-1.0.jar"))
        write(os.path.join(d, "app-1.0-all.jar"), "fat", T0)
        self.assertEqual(buildhelper.pick_jar(d), os.path.join(d, "app-1.0-all.jar"))
        self.assertIsNone(buildhelper.pick_jar(os.path.join(d, "missing")))

    def test_replaces_by_rename_so_a_running_jvm_keeps_its_jar(self) -> None:
        d = os.path.abspath(self.mktemp())
        dest = write(os.path.join(d, "bin", "svc.jar"), "old jar")
        stamp = os.path.join(d, "bin", ".svc.jar.inputs")
        with open(dest) as running:            # what the old JVM has open
            built = write(os.path.join(d, "build", "libs", "svc-1.0.jar"), "new jar")
            buildhelper.install_jar(os.path.dirname(built), dest, stamp, "digest-1")
            self.assertEqual(running.read(), "old jar")
        with open(dest) as f:
            self.assertEqual(f.read(), "new jar")
        self.assertTrue(os.path.exists(built))     # a build tool's output stays
        with open(stamp) as f:
            self.assertEqual(f.read(), "digest-1\n")
        temp = write(os.path.join(d, "bin", ".svc.building.jar"), "kotlinc jar")
        buildhelper.install_jar(temp, dest)
        self.assertFalse(os.path.exists(temp))     # our own temp jar is moved
        self.assertEqual(sorted(os.listdir(os.path.join(d, "bin"))),
                         [".svc.jar.inputs", "svc.jar"])

    def test_no_jar_after_the_build_fails_the_step(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        e = self.assertRaises(SystemExit, buildhelper.main,
                              ["install-jar", d, os.path.join(d, "x.jar")])
        self.assertIn("left no runnable jar", str(e.code))

    def test_usage(self) -> None:
        self.assertEqual(buildhelper.main(["frobnicate"]), 2)
        self.assertIn("install-jar SOURCE DEST", self.out.getvalue())


# ------------------------------------------------------------------------------ python

class PythonTests(SpecMixin, unittest.TestCase):
    def setUp(self) -> None:
        from tqserver.runtimes import python
        self.python = python
        self.runtime = python.PythonRuntime()
        self.uv = executable(os.path.join(os.path.abspath(self.mktemp()), "uv"))
        self.patch(python, "find_uv", lambda: self.uv)

    def installed(self, spec) -> None:
        """What a successful install leaves: the venv's python and the stamp."""
        executable(os.path.join(spec.directory, ".venv", "bin", "python"))
        for step in self.runtime.build_steps(spec):
            if "stamp" in step.argv:
                buildhelper.main(step.argv[2:])

    def test_script_or_app_on_the_supervisors_interpreter(self) -> None:
        spec = self.make_spec("python")
        self.assertEqual(self.runtime.build_steps(spec), [])
        self.assertEqual(self.runtime.run_argv(spec, 9000),
                         [sys.executable, os.path.join(spec.directory, "src", "main.py")])
        spec = attrs.evolve(spec, config=attrs.evolve(spec.config, python=attrs.evolve(
            spec.config.python, app="shop.web:create_app()")))
        self.assertEqual(self.runtime.run_argv(spec, 9000),
                         [sys.executable, "-m", "tqserver.worker", "shop.web:create_app()"])

    def test_interpreter_per_worker(self) -> None:
        spec = self.make_spec("python")
        python = lambda name: attrs.evolve(spec, config=attrs.evolve(  # noqa: E731
            spec.config, python=attrs.evolve(spec.config.python, interpreter=name)))
        found = shutil.which("python3")
        self.assertEqual(self.runtime.run_argv(python("python3"), 1)[0], found)
        e = self.assertRaises(ToolchainMissing, self.runtime.build_steps, python("python3.99"))
        self.assertIn("'python3.99' is not installed", str(e))
        local = executable(os.path.join(spec.directory, "py", "bin", "python"))
        self.assertEqual(self.runtime.run_argv(python("py/bin/python"), 1)[0], local)
        self.assertRaises(ToolchainMissing, self.runtime.build_steps, python("/no/python"))

    def test_dependencies_installed_into_the_workers_venv_only_when_changed(self) -> None:
        spec = self.make_spec("python")
        req = write(os.path.join(spec.directory, "requirements.txt"), "flask==3.0.3\n")
        venv = os.path.join(spec.directory, ".venv")
        steps = self.runtime.build_steps(spec)
        self.assertEqual([s.argv[:3] for s in steps],
                         [[self.uv, "venv", "--clear"], [self.uv, "pip", "install"],
                          [sys.executable, runtimes.HELPER, "stamp"]])
        self.assertEqual(steps[0].argv[3:], ["--python", sys.executable, venv])
        self.assertEqual(steps[1].argv[3:], ["--compile-bytecode", "--python",
                                             os.path.join(venv, "bin", "python"), "-r", req])
        self.assertEqual(steps[1].env["UV_PYTHON_DOWNLOADS"], "never")
        self.installed(spec)
        self.assertEqual(self.runtime.build_steps(spec), [])    # unchanged: no install
        self.assertEqual(self.runtime.run_argv(spec, 1)[0], os.path.join(venv, "bin", "python"))
        env = self.runtime.env(spec, 1)
        self.assertEqual(env["VIRTUAL_ENV"], venv)
        self.assertTrue(env["PATH"].startswith(os.path.join(venv, "bin") + os.pathsep))
        self.assertEqual(env["PYTHONPATH"], self.python.WORKER_PATH)
        # A changed manifest installs again, into the same venv.
        write(req, "flask==3.0.3\nitsdangerous\n")
        steps = self.runtime.build_steps(spec)
        self.assertEqual([s.argv[1] for s in steps[:1]], ["pip"])
        # python.app adds the ASGI server; another interpreter makes the venv anew.
        self.installed(spec)
        other = next((p for p in map(shutil.which, ("pypy3", "python3")) if p and
                      os.path.realpath(p) != os.path.realpath(sys.executable)), None)
        if other is None:
            raise unittest.SkipTest("no second interpreter (pypy3, python3) on PATH")
        app = attrs.evolve(spec, config=attrs.evolve(spec.config, python=attrs.evolve(
            spec.config.python, app="main:app", interpreter=other)))
        steps = self.runtime.build_steps(app)
        self.assertEqual(steps[0].argv[1:3], ["venv", "--clear"])
        self.assertEqual(steps[1].argv[-1], "uvicorn")

    def test_pyproject_and_the_pip_fallback(self) -> None:
        self.patch(self.python, "find_uv", lambda: None)
        spec = self.make_spec("python")
        toml = write(os.path.join(spec.directory, "pyproject.toml"),
                     '[project]\nname = "x"\ndependencies = ["flask>=3", "itsdangerous"]\n')
        venv = os.path.join(spec.directory, ".venv")
        py = os.path.join(venv, "bin", "python")
        steps = self.runtime.build_steps(spec)
        self.assertEqual(steps[0].argv, [sys.executable, "-m", "venv", "--clear", venv])
        self.assertEqual(steps[1].argv[1:3], [runtimes.HELPER, "pyproject-requirements"])
        listed = steps[1].argv[-1]
        self.assertEqual(steps[2].argv, [py, "-m", "pip", "install",
                                         "--disable-pip-version-check", "-r", listed])
        if sys.version_info >= (3, 11):
            buildhelper.main(steps[1].argv[2:])
            with open(listed) as f:
                self.assertEqual(f.read(), "flask>=3\nitsdangerous\n")
        self.assertTrue(toml)

    def test_worker_path_has_tqserver_worker_and_nothing_else(self) -> None:
        # -S: no site-packages, so only what PYTHONPATH gives is importable.
        import subprocess
        env = dict(os.environ, PYTHONPATH=self.python.WORKER_PATH)
        code = ("import sys, tqserver.worker\n"
                "try:\n    import twisted\nexcept ImportError:\n    print('isolated')\n")
        out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True,
                             text=True, timeout=30)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "isolated"), out.stderr)


# ------------------------------------------------------------------------------ command

class CommandTests(SpecMixin, unittest.TestCase):
    def test_port_replaced_in_every_argv_element(self) -> None:
        spec = self.make_spec("command", command=(
            "server", "--listen=127.0.0.1:{port}", "{port}", "-p{port},{port}", "{ports}",
            '{"json": 1}'))
        self.assertEqual(CommandRuntime().run_argv(spec, 9123), [
            "server", "--listen=127.0.0.1:9123", "9123", "-p9123,9123", "{ports}",
            '{"json": 1}'])

    def test_port_replaced_in_env_values(self) -> None:
        spec = self.make_spec("command", command=("sh",),
                              env={"ADDR": "127.0.0.1:{port}", "PLAIN": "x", "{port}": "key"})
        self.assertEqual(CommandRuntime().config_env(spec, 9123),
                         {"ADDR": "127.0.0.1:9123", "PLAIN": "x", "{port}": "key"})

    def test_instance_gets_substituted_argv_and_env(self) -> None:
        spec = self.make_spec("command", command=("sh", "-c", "exec srv --port {port}"),
                              env={"LISTEN": ":{port}"})
        reactor = FakeProcessReactor()
        settings = default_server_config().workers
        ctx = PoolContext(reactor=reactor, root=spec.directory, mode="prod",
                          ports=PortPool(9300, 9301, is_free=lambda p: True),
                          settings=lambda: settings, probe=ScriptedProbe())
        pool = WorkerPool(spec, CommandRuntime(), ctx)
        pool.startService()
        [spawned] = reactor.spawned
        self.assertEqual(spawned.argv[-3:], ["sh", "-c", "exec srv --port 9300"])
        self.assertEqual(spawned.env["LISTEN"], ":9300")
        self.assertEqual(spawned.env["WORKER_TYPE"], "command")

    def test_empty_command_is_a_build_error_not_a_crash_loop(self) -> None:
        spec = self.make_spec("command", command=())
        e = self.assertRaises(CannotBuild, CommandRuntime().build_steps, spec)
        self.assertIn("needs a non-empty `command:`", str(e))
        reactor = FakeProcessReactor()
        settings = default_server_config().workers
        ctx = PoolContext(reactor=reactor, root=spec.directory, mode="dev",
                          ports=PortPool(9300, 9301, is_free=lambda p: True),
                          settings=lambda: settings, probe=ScriptedProbe())
        pool = WorkerPool(spec, CommandRuntime(), ctx)
        pool.startService()
        self.assertEqual(reactor.spawned, [])
        self.assertEqual(pool.status, "failed")
        self.assertIn("needs a non-empty", pool.build_error)
        pool.spec = attrs.evolve(spec, config=attrs.evolve(spec.config, command=("sh",)))
        pool.deploy("configuration changed")
        self.assertIsNone(pool.build_error)        # fixed: the error page goes away
        self.assertEqual(len(reactor.spawned), 1)

    def test_command_not_found(self) -> None:
        spec = self.make_spec("command", command=("no-such-program-tqserver", "{port}"))
        e = self.assertRaises(CannotBuild, CommandRuntime().build_steps, spec)
        self.assertIn("command not found: 'no-such-program-tqserver'", str(e))
        spec = self.make_spec("command", command=("/nonexistent/server",))
        self.assertRaises(CannotBuild, CommandRuntime().build_steps, spec)

    def test_path_from_env_is_searched(self) -> None:
        tools = os.path.abspath(self.mktemp())
        executable(os.path.join(tools, "my-server"))
        spec = self.make_spec("command", command=("my-server",), env={"PATH": tools})
        self.assertEqual(CommandRuntime().build_steps(spec), [])
        spec = self.make_spec("command", command=("./relative-is-checked-at-start",))
        self.assertEqual(CommandRuntime().build_steps(spec), [])


class ReloadInputsTests(SpecMixin, unittest.TestCase):
    """What a prod reload (fingerprint.Fingerprint over build_inputs) counts as a change:
    the worker's sources, never what its build or its program writes."""

    def setUp(self) -> None:
        # Later than any directory's own mtime, which counts too.
        self.later = time.time_ns() + 3600 * 10**9
        self.patch(runtimes.bun, "find_tool", lambda name, *f: "/bin/true")

    def touch(self, spec: WorkerSpec, rel: str) -> None:
        self.later += 10**9
        write(os.path.join(spec.directory, rel), "changed", self.later)

    def test_command_worker_files_are_its_sources(self) -> None:
        spec = self.make_spec("command", command=("python3", "echo.py"))
        for rel in ("echo.py", "lib/util.py", "config/worker.yaml", "public/app.css",
                    "logs/echo.log", "data/db.sqlite", ".git/HEAD"):
            write(os.path.join(spec.directory, rel))
        runtime = CommandRuntime()
        self.assertEqual(runtime.build_inputs(spec), [
            os.path.join(spec.directory, "echo.py"), os.path.join(spec.directory, "lib")])
        before = Fingerprint.take(spec, runtime)
        for rel in ("public/app.css", "logs/echo.log", "data/db.sqlite"):
            self.touch(spec, rel)
        self.assertIsNone(before.difference(Fingerprint.take(spec, runtime)))
        self.touch(spec, "lib/util.py")
        self.assertEqual(before.difference(Fingerprint.take(spec, runtime)), "sources")

    def test_bun_install_output_is_not_a_source_change(self) -> None:
        spec = self.make_spec("bun", "api")
        for rel in ("index.ts", "package.json", "public/app.js"):
            write(os.path.join(spec.directory, rel))
        runtime = BunRuntime()
        before = Fingerprint.take(spec, runtime)
        for rel in ("node_modules/.tqserver-installed", "node_modules/dep/index.ts",
                    "public/app.js"):
            self.touch(spec, rel)
        self.assertIsNone(before.difference(Fingerprint.take(spec, runtime)))
        for rel in ("lib/new.ts", "package.json", "bun.lock"):
            before = Fingerprint.take(spec, runtime)
            self.touch(spec, rel)
            self.assertEqual(before.difference(Fingerprint.take(spec, runtime)), "sources", rel)

    def test_kotlin_build_output_is_not_a_source_change(self) -> None:
        spec = self.make_spec("kotlin", "svc")
        write(os.path.join(spec.directory, "src", "Main.kt"))
        runtime = KotlinRuntime()
        before = Fingerprint.take(spec, runtime)
        for rel in ("bin/.svc.building.jar", "bin/.svc.jar.inputs", "build/libs/svc.jar",
                    "target/svc.jar"):
            self.touch(spec, rel)
        self.assertIsNone(before.difference(Fingerprint.take(spec, runtime)))
        self.touch(spec, "src/Main.kt")
        self.assertEqual(before.difference(Fingerprint.take(spec, runtime)), "sources")
        before = Fingerprint.take(spec, runtime)
        self.touch(spec, "bin/svc.jar")           # a jar deployed by rsync: restart it
        self.assertEqual(before.difference(Fingerprint.take(spec, runtime)), "artifact")


class GoBuildTests(SpecMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.go = executable(os.path.abspath(self.mktemp()) + "/bin/go")
        self.patch(runtimes.go, "find_tool", lambda name, *fallbacks: self.go)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "GOFLAGS"})
        self.runtime = runtimes.go.GoRuntime()
        self.spec = self.make_spec("go", "hello")
        write(os.path.join(self.spec.directory, "go.mod"), "module hello\n", T0)
        write(os.path.join(self.spec.directory, "src", "main.go"), "package main\n", T0)

    def built(self, steps) -> None:
        """What a successful build leaves: the binary, then the stamp (the real helper)."""
        write(self.runtime.artifact(self.spec), "binary")
        self.assertEqual(buildhelper.main(steps[-1].argv[2:]), 0)

    def test_dev_and_prod_flags(self) -> None:
        out = self.runtime.artifact(self.spec)
        dev, _ = self.runtime.build_steps(self.spec, "dev")
        self.assertEqual(dev.argv, [self.go, "build", "-buildvcs=false", "-o", out, "./src"])
        prod, _ = self.runtime.build_steps(self.spec, "prod")
        self.assertEqual(prod.argv, [self.go, "build", "-buildvcs=false", "-trimpath",
                                     "-ldflags=-s -w", "-o", out, "./src"])
        spec = attrs.evolve(self.spec, config=attrs.evolve(
            self.spec.config, go=attrs.evolve(self.spec.config.go, build_flags=("-race",))))
        self.assertEqual(self.runtime.build_steps(spec, "prod")[0].argv[4:6],
                         ["-ldflags=-s -w", "-race"])       # the worker's own flags last

    def test_an_up_to_date_binary_is_not_rebuilt_nor_needs_go(self) -> None:
        self.built(self.runtime.build_steps(self.spec, "dev"))
        self.assertEqual(self.runtime.build_steps(self.spec, "dev"), [])
        self.assertEqual(len(self.runtime.build_steps(self.spec, "prod")), 2)  # other flags
        self.patch(runtimes.go, "find_tool", lambda name, *fallbacks: None)
        self.assertEqual(self.runtime.build_steps(self.spec, "dev"), [])       # no Go needed
        write(os.path.join(self.spec.directory, "src", "main.go"), "package main\n", T0 + 1)
        self.assertRaises(ToolchainMissing, self.runtime.build_steps, self.spec, "dev")

    def test_any_input_change_or_a_missing_binary_rebuilds(self) -> None:
        self.built(self.runtime.build_steps(self.spec, "prod"))
        self.assertEqual(self.runtime.build_steps(self.spec, "prod"), [])
        write(os.path.join(self.spec.directory, "go.sum"), "", T0)
        self.assertEqual(len(self.runtime.build_steps(self.spec, "prod")), 2)
        os.remove(os.path.join(self.spec.directory, "go.sum"))
        self.assertEqual(self.runtime.build_steps(self.spec, "prod"), [])
        os.remove(self.runtime.artifact(self.spec))
        self.assertEqual(len(self.runtime.build_steps(self.spec, "prod")), 2)

    def test_the_stamp_holds_in_a_copy_of_the_tree_elsewhere(self) -> None:
        self.built(self.runtime.build_steps(self.spec, "prod"))
        copy = os.path.abspath(self.mktemp())
        shutil.copytree(self.spec.directory, copy)       # copy2 keeps mtimes, as rsync -a
        moved = attrs.evolve(self.spec, directory=copy)
        self.assertEqual(self.runtime.build_steps(moved, "prod"), [])


class PhpLintTests(SpecMixin, unittest.TestCase):
    def setUp(self) -> None:
        from tqserver.runtimes import php
        self.php = php
        self.spec = self.make_spec("php", "blog")
        write(os.path.join(self.spec.directory, "public", "index.php"), "<?php echo 1;\n")
        self.patch(php.PhpRuntime, "binary", lambda self, spec: "/usr/sbin/php-fpm")

    def test_prod_lints_every_script_dev_does_not(self) -> None:
        self.patch(self.php, "find_php_cli", lambda: "/usr/bin/php")
        write(os.path.join(self.spec.directory, "views", "layout.php"), "<?php\n")
        write(os.path.join(self.spec.directory, "public", "style.css"), "")
        runtime = self.php.PhpRuntime()
        self.assertEqual(runtime.build_steps(self.spec, "dev"), [])
        (lint,) = runtime.build_steps(self.spec, "prod")
        self.assertEqual(lint.argv[2:], ["php-lint", "/usr/bin/php", "public/index.php",
                                         "views/layout.php"])
        self.assertEqual(lint.cwd, self.spec.directory)

    def test_without_the_php_cli_nothing_is_linted(self) -> None:
        self.patch(self.php, "find_php_cli", lambda: None)
        self.assertEqual(self.php.PhpRuntime().build_steps(self.spec, "prod"), [])

    def test_the_lint_helper_fails_on_a_syntax_error(self) -> None:
        php = self.php.find_php_cli()
        if php is None:
            raise unittest.SkipTest("no PHP CLI installed")
        d = self.spec.directory
        write(os.path.join(d, "public", "broken.php"), "<?php echo 'x'\n$y = ;\n")
        good, bad = os.path.join(d, "public", "index.php"), os.path.join(d, "public", "broken.php")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(buildhelper.php_lint(php, [good]), 0)
        self.assertEqual(buildhelper.php_lint(php, [good, bad]), 1)
        self.assertIn("syntax error", out.getvalue())
        self.assertIn("1 of 2 files without syntax errors", out.getvalue())


class GoBuildEnvTests(unittest.TestCase):
    def test_dev_builds_skip_symbols_prod_keeps_them(self) -> None:
        from tqserver.runtimes.go import GoRuntime
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "GOFLAGS"})
        runtime = GoRuntime()
        self.assertEqual(runtime.build_env(None, "dev"), {"GOFLAGS": "-ldflags=-s"})
        self.assertEqual(runtime.build_env(None, "prod"), {})
        os.environ["GOFLAGS"] = "-mod=vendor"            # the user's own flags win
        self.assertEqual(runtime.build_env(None, "dev"), {})
