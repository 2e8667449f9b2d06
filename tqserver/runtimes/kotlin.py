"""Kotlin (JVM) workers: built to bin/<name>.jar, run with ``java <jvm_args> -jar``.

The build is ``kotlinc`` on the sources under src/, or the worker's own Gradle (gradlew
first) or Maven (mvnw first) build when it has a build file. The jar is put in place by
rename after a successful build (a running JVM must not see its jar rewritten), together
with a digest of the build inputs: an unchanged worker is not recompiled (a kotlinc run
costs several seconds) when the supervisor restarts or reloads. Delete bin/ to force it.
"""

from __future__ import annotations

import os

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import (
    BuildStep,
    CannotBuild,
    Runtime,
    ToolchainMissing,
    binary_name,
    find_tool,
    helper_step,
)
from tqserver.runtimes.stamps import inputs_digest, is_fresh, walk_files

JAVA_HINT = (
    "Java is not installed: install a JDK (apt-get install default-jdk-headless, "
    "or bin/install-toolchains --only java) and make sure `java` is on PATH"
)
KOTLINC_HINT = (
    "the Kotlin compiler is not installed: bin/install-toolchains --only kotlin "
    "(a JDK and kotlinc), or put kotlinc on PATH"
)
GRADLE_HINT = (
    "Gradle is not installed and the worker has no gradlew: install Gradle "
    "(https://gradle.org/install/) or add the Gradle wrapper to the worker"
)
MAVEN_HINT = (
    "Maven is not installed and the worker has no mvnw: apt-get install maven, "
    "or add the Maven wrapper to the worker"
)

GRADLE_FILES = ("build.gradle.kts", "build.gradle")
BUILD_FILES = GRADLE_FILES + (
    "settings.gradle.kts",
    "settings.gradle",
    "gradle.properties",
    "pom.xml",
)


class KotlinRuntime(Runtime):
    type = "kotlin"

    # -- toolchain ---------------------------------------------------------------------
    def java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        tool = find_tool(
            "java",
            *([os.path.join(java_home, "bin", "java")] if java_home else []),
            "/usr/lib/jvm/default-java/bin/java",
        )
        if tool is None:
            raise ToolchainMissing(JAVA_HINT)
        return tool

    def kotlinc(self) -> str:
        tool = find_tool(
            "kotlinc",
            "/usr/local/bin/kotlinc",
            "/opt/kotlinc/bin/kotlinc",
            os.path.expanduser("~/.sdkman/candidates/kotlin/current/bin/kotlinc"),
        )
        if tool is None:
            raise ToolchainMissing(KOTLINC_HINT)
        return tool

    def build_kind(self, spec: WorkerSpec) -> str:
        """ "gradle" or "maven" when the worker has their build file, else "kotlinc"."""
        d = spec.directory
        if any(os.path.isfile(os.path.join(d, n)) for n in GRADLE_FILES):
            return "gradle"
        if os.path.isfile(os.path.join(d, "pom.xml")):
            return "maven"
        return "kotlinc"

    def _wrapper_or(self, spec: WorkerSpec, wrapper: str, tool: str, hint: str) -> list[str]:
        path = os.path.join(spec.directory, wrapper)
        if os.path.isfile(path):
            return [path] if os.access(path, os.X_OK) else ["/bin/sh", path]
        found = find_tool(tool)
        if found is None:
            raise ToolchainMissing(hint)
        return [found]

    # -- paths -------------------------------------------------------------------------
    def artifact(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, "bin", binary_name(spec) + ".jar")

    def stamp(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, "bin", f".{binary_name(spec)}.jar.inputs")

    def sources(self, spec: WorkerSpec) -> list[str]:
        return [p for p in walk_files([os.path.join(spec.directory, "src")]) if p.endswith(".kt")]

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        d = spec.directory
        return [os.path.join(d, "src"), os.path.join(d, "gradle")] + [
            os.path.join(d, n) for n in BUILD_FILES
        ]

    def up_to_date(self, spec: WorkerSpec) -> tuple[bool, str]:
        """Whether bin/<name>.jar was built from the inputs as they are now, and their
        digest (recorded next to the jar by a successful build)."""
        kind = self.build_kind(spec)
        digest = inputs_digest(spec.directory, kind, walk_files(self.build_inputs(spec)))
        return is_fresh(self.artifact(spec), self.stamp(spec), digest), digest

    # -- build and run -----------------------------------------------------------------
    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        self.java()  # needed to build and to run: say so before anything else
        fresh, digest = self.up_to_date(spec)
        if fresh:
            return []
        d = spec.directory
        jar, stamp = self.artifact(spec), self.stamp(spec)
        kind = self.build_kind(spec)
        if kind == "gradle":
            argv = self._wrapper_or(spec, "gradlew", "gradle", GRADLE_HINT)
            build = BuildStep(argv + ["build", "--no-daemon", "--console=plain"], d)
            output = os.path.join(d, "build", "libs")
        elif kind == "maven":
            argv = self._wrapper_or(spec, "mvnw", "mvn", MAVEN_HINT)
            build = BuildStep(argv + ["-q", "-B", "package"], d)
            output = os.path.join(d, "target")
        else:
            sources = self.sources(spec)
            if not sources:
                if os.path.isfile(jar):
                    return []  # a deployed jar, and no sources to rebuild it from
                raise CannotBuild(
                    "no Kotlin sources: put *.kt files in src/ (or give the "
                    "worker a build.gradle(.kts) or pom.xml)"
                )
            output = os.path.join("bin", f".{binary_name(spec)}.building.jar")
            build = BuildStep(
                [self.kotlinc()]
                + [os.path.relpath(s, d) for s in sources]
                + ["-include-runtime", "-d", output],
                d,
            )
        return [build, helper_step(d, "install-jar", output, jar, stamp, digest)]

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        kotlin = spec.config.kotlin
        argv = [self.java()] + list(kotlin.jvm_args)
        if kotlin.main_class:
            return argv + ["-cp", self.artifact(spec), kotlin.main_class]
        return argv + ["-jar", self.artifact(spec)]
