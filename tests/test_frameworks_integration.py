"""Framework applications as their users write them, through the real twistd: each
framework installed from its registry into the worker's own environment by the build step
(Flask, Django and FastAPI into workers/<name>/.venv, Hono into node_modules, Ktor by Maven), mounted under a
prefix, with links, redirects and cookies right; the dev loop around them (startup
errors on the page, crash loops in /health, hot reload across installs).

Downloads are shared: uv's cache lives in the trial temp directory for the whole run."""

from __future__ import annotations

import json
import os
import re
import shutil

from twisted.trial import unittest

from .support import Client, sleep, stop_twistd, wait_until
from .test_integration import IntegrationBase, d


def cookie_of(response, name: str):
    """(value, attributes) of the Set-Cookie for ``name``."""
    for header in response.headers.getRawHeaders("set-cookie") or []:
        pair, _, attributes = header.partition(";")
        key, _, value = pair.partition("=")
        if key.strip() == name:
            attrs = {}
            for part in attributes.split(";"):
                k, _, v = part.strip().partition("=")
                attrs[k.lower()] = v
            return value, attrs
    return None, {}


def inotify_watches(pid: int) -> int:
    """How many inotify watches the process holds (the kernel lists them per descriptor)."""
    count = 0
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            with open(os.path.join(fdinfo, fd)) as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            pass
    return count


class FrameworkBase(IntegrationBase):
    timeout = 600

    def start(self, project, *args, **kw):
        env = dict(kw.pop("env", None) or {})
        # One download per run: trial runs tests in its temp directory.
        env.setdefault("UV_CACHE_DIR", os.path.abspath(os.path.join("..", "uv-cache")))
        return IntegrationBase.start(self, project, *args, env=env, **kw)

    def built_seconds(self, proc, worker: str) -> float:
        found = re.findall(rf"built {re.escape(worker)} in ([0-9.]+)s", proc.text)
        return float(found[-1]) if found else -1.0


class FlaskTests(FrameworkBase):
    """The example worker workers/flask: a form POST, a redirect, a cookie session, a
    template and a static file, under /flask."""

    def test_flask_app_under_a_prefix(self):
        return d(self._flask())

    async def _flask(self):
        project = self.make_project()
        project.copy_worker("flask")
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["flask"], timeout=400)
        self.assertTrue(
            os.path.exists(
                os.path.join(project.root, "workers", "flask", ".venv", ".tqserver-installed")
            )
        )
        base = project.url + "/flask"

        response, _ = await client.get(base + "?from=menu")
        self.assertEqual(
            (response.code, response.headers.getRawHeaders("location")),
            (301, ["/flask/?from=menu"]),
        )

        response, page = await client.get(base + "/")
        self.assertEqual(response.code, 200, page)
        self.assertIn(b'href="/flask/static/style.css"', page)
        self.assertIn(b'action="/flask/notes"', page)
        self.assertIn(b"no notes yet", page)
        self.assertIn(b"<code>/flask</code>", page)  # request.script_root

        response, css = await client.get(base + "/static/style.css")
        self.assertEqual(response.code, 200)
        self.assertIn(b"font:", css)

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        response, _ = await client.request(b"POST", base + "/notes", b"text=first+note", form)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/flask/"])
        session, attributes = cookie_of(response, "session")
        self.assertTrue(session)
        self.assertTrue(
            base.endswith(attributes.get("path", "/").rstrip("/")) or attributes.get("path") == "/",
            attributes,
        )

        cookie = {"Cookie": f"session={session}"}
        response, _ = await client.request(
            b"POST", base + "/notes", b"text=second", dict(form, **cookie)
        )
        session, _ = cookie_of(response, "session")
        response, page = await client.get(base + "/", {"Cookie": f"session={session}"})
        self.assertIn(b"<li>first note</li><li>second</li>", page)

        # The app has no /health of its own: TQServer answers it for the app.
        response, body = await client.get(base + "/health")
        self.assertEqual((response.code, body), (200, b"ok"))

        # An unchanged rebuild skips the install: the admin API's reload-all rebuilds.
        installed = self.built_seconds(proc, "flask")
        response, _ = await client.request(b"POST", project.admin_url + "/_tqserver/api/reload")
        self.assertEqual(response.code, 202)
        await wait_until(lambda: self._swaps(client, project, 2), 60, "a second swap", proc)
        self.assertEqual(proc.text.count("building flask"), 1, proc.text[-3000:])
        self.assertGreater(installed, 0)

    async def _swaps(self, client, project, n):
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        return len([i for i in status["workers"]["flask"]["instances"]]) == 1 and status["workers"][
            "flask"
        ]["instances"][0]["id"].endswith(f"#{n}")


FASTAPI_APP = """
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from pydantic import BaseModel

state = {}


@asynccontextmanager
async def lifespan(app):
    state["started"] = "yes"
    yield
    print("fastapi lifespan shutdown ran", flush=True)


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float


@app.post("/items")
async def create(item: Item):
    return {"name": item.name, "total": item.price * 2, "started": state.get("started")}


@app.get("/slow")
async def slow():
    import asyncio
    print("SLOW-BEGIN", flush=True)
    await asyncio.sleep(1)
    return "slow done"


@app.get("/where")
async def where(request: Request):
    return {"root_path": request.scope["root_path"], "url": str(request.url_for("where"))}
"""


class FastAPITests(FrameworkBase):
    """FastAPI on uvicorn in its own venv, on a per-worker interpreter (python3)."""

    def test_fastapi_app_under_a_prefix(self):
        return d(self._fastapi())

    async def _fastapi(self):
        if shutil.which("python3") is None:
            raise unittest.SkipTest("no python3 on PATH")
        project = self.make_project()
        project.write(
            "workers/fastapi/config/worker.yaml",
            'type: python\npython:\n  app: "main:app"\n  interpreter: python3\n',
        )
        project.write("workers/fastapi/requirements.txt", "fastapi>=0.110\n")
        project.write("workers/fastapi/main.py", FASTAPI_APP)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["fastapi"], timeout=400)
        base = project.url + "/fastapi"

        json_type = {"Content-Type": "application/json"}
        response, body = await client.request(
            b"POST", base + "/items", b'{"name": "pen", "price": 1.25}', json_type
        )
        self.assertEqual(
            (response.code, json.loads(body)),
            (200, {"name": "pen", "total": 2.5, "started": "yes"}),
        )
        response, body = await client.request(b"POST", base + "/items", b'{"name": 3}', json_type)
        self.assertEqual(response.code, 422, body)
        self.assertIn("price", body.decode())

        response, body = await client.get(base + "/where")
        self.assertEqual(
            json.loads(body), {"root_path": "/fastapi", "url": project.url + "/fastapi/where"}
        )

        response, page = await client.get(base + "/docs")
        self.assertEqual(response.code, 200)
        self.assertIn(b"/fastapi/openapi.json", page)
        response, body = await client.get(base + "/openapi.json")
        self.assertEqual(response.code, 200)
        spec = json.loads(body)
        self.assertIn("/items", spec["paths"])

        response, body = await client.get(base + "/health")
        self.assertEqual((response.code, body), (200, b"ok"))

        await self._serve_script_drains(project)

        # SIGTERM: uvicorn drains and runs the lifespan shutdown.
        self.assertEqual(await stop_twistd(proc), 0)
        logs = os.path.join(project.root, "logs")
        text = "".join(
            open(os.path.join(logs, n)).read()
            for n in os.listdir(logs)
            if n.startswith("worker_fastapi_")
        )
        self.assertIn("fastapi lifespan shutdown ran", text)

    async def _serve_script_drains(self, project):
        """The same app handed to serve() in a script, on the worker's venv: served on
        uvicorn (not a 500 per request); SIGTERM with a request in flight lets it finish,
        then lifespan shutdown runs."""
        from twisted.internet import reactor

        from tqserver.runtimes.python import WORKER_PATH

        from .test_worker_runtime import WorkerProcess, free_port

        worker = os.path.join(project.root, "workers", "fastapi")
        project.write(
            "workers/fastapi/serve_it.py",
            "from main import app\nfrom tqserver.worker import serve\nserve(app)\n",
        )
        port = free_port()
        env = dict(os.environ, WORKER_PORT=str(port), PYTHONPATH=WORKER_PATH)
        env.pop("TQSERVER_URL", None)
        python = os.path.join(worker, ".venv", "bin", "python")
        child = WorkerProcess()
        reactor.spawnProcess(child, python, [python, "serve_it.py"], env=env, path=worker)

        def reap():
            if child.running:
                child.signal("KILL")
            return child.ended()

        self.addCleanup(reap)
        client = Client(self)
        url = f"http://127.0.0.1:{port}"
        await wait_until(lambda: self._answers(client, url + "/health"), 60, "serve(app) up")
        response, body = await client.get(url + "/where")
        self.assertEqual(response.code, 200, body)
        slow = d(client.get(url + "/slow"))
        await child.wait_for("out", b"SLOW-BEGIN", 20)
        child.signal("TERM")
        response, body = await slow
        self.assertEqual((response.code, body), (200, b'"slow done"'))
        code = await child.ended()
        # uvicorn (recent versions) re-raises the signal once its shutdown is done: so the process
        # ends by SIGTERM after draining, rather than with status 0.
        self.assertIn((code, child.exit_signal), [(0, None), (None, 15)], child.err)
        self.assertIn(b"fastapi lifespan shutdown ran", child.out)
        self.assertIn(b"Application shutdown complete", child.err)

    async def _answers(self, client, url):
        try:
            response, _ = await client.get(url)
        except Exception:
            return False
        return response.code == 200


STARTUP_OK = """
from tqserver.worker import serve

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"version %d"]

serve(app)
"""


DJANGO_SETTINGS = """
SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "mysite.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.sessions"]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
DATABASES = {}
TEMPLATES = []
USE_TZ = True
"""

DJANGO_URLS = """
from django.http import HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect
from django.urls import path, reverse


def home(request):
    request.session["seen"] = request.session.get("seen", 0) + 1
    return HttpResponse(
        '<a href="%s">item</a> %s seen=%d'
        % (reverse("item", args=[7]), request.build_absolute_uri(), request.session["seen"]))


def item(request, n):
    return HttpResponse("item %d at %s" % (n, request.path))


def go(request):
    return redirect("item", n=7)


def form(request):
    if request.method == "POST":
        return redirect("item", n=int(request.POST["n"]))
    return HttpResponse(
        '<form method=post action="%s"><input name=csrfmiddlewaretoken value="%s"></form>'
        % (reverse("form"), get_token(request)))


urlpatterns = [
    path("", home, name="home"),
    path("items/<int:n>/", item, name="item"),
    path("go/", go, name="go"),
    path("form/", form, name="form"),
]
"""

DJANGO_WSGI = """
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
application = get_wsgi_application()
"""


class DjangoTests(FrameworkBase):
    """A Django project as `django-admin startproject` lays it out (mysite/settings.py,
    urls.py, wsgi.py), Django from PyPI in the worker's venv, served at /shop with no
    FORCE_SCRIPT_NAME: reverse(), redirects, APPEND_SLASH, build_absolute_uri and the
    CSRF check (with a browser's Origin) all see the prefix and the public host."""

    def test_django_project_under_a_prefix(self):
        return d(self._django("mysite.wsgi:application"))

    def test_django_on_asgi_under_a_prefix(self):
        """The same project's asgi.py, on uvicorn (root_path=/shop)."""
        return d(self._django("mysite.asgi:application"))

    async def _django(self, app: str):
        if shutil.which("python3") is None:
            raise unittest.SkipTest("no python3 on PATH")
        project = self.make_project()
        project.write(
            "workers/shop/config/worker.yaml",
            f'type: python\npython:\n  app: "{app}"\n  interpreter: python3\n',
        )
        project.write("workers/shop/requirements.txt", "Django>=4.2,<6\n")
        project.write("workers/shop/mysite/__init__.py", "")
        project.write("workers/shop/mysite/settings.py", DJANGO_SETTINGS)
        project.write("workers/shop/mysite/urls.py", DJANGO_URLS)
        project.write("workers/shop/mysite/wsgi.py", DJANGO_WSGI)
        project.write("workers/shop/mysite/asgi.py", DJANGO_WSGI.replace("wsgi", "asgi")
                      .replace("get_wsgi_application", "get_asgi_application"))
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["shop"], timeout=400)
        base = project.url + "/shop"

        response, page = await client.get(base + "/")
        self.assertEqual(response.code, 200, page)
        self.assertIn(b'<a href="/shop/items/7/">', page)                  # reverse()
        self.assertIn(f" {base}/ seen=1".encode(), page)                    # build_absolute_uri
        session, attributes = cookie_of(response, "sessionid")
        self.assertTrue(session)
        response, page = await client.get(base + "/", {"Cookie": f"sessionid={session}"})
        self.assertIn(b"seen=2", page)

        response, _ = await client.get(base + "/go/")
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/7/"]))
        response, _ = await client.get(base + "/items/7")                   # APPEND_SLASH
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (301, ["/shop/items/7/"]))
        response, body = await client.get(base + "/items/7/")   # (dev: + the reload script)
        self.assertEqual((response.code, body[:24]), (200, b"item 7 at /shop/items/7/"))

        response, page = await client.get(base + "/form/")
        self.assertIn(b'action="/shop/form/"', page)
        token = re.search(rb'value="([^"]+)"', page).group(1).decode()
        csrf, _ = cookie_of(response, "csrftoken")
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Cookie": f"csrftoken={csrf}", "Origin": project.url,
                   "Referer": base + "/form/"}
        body = f"csrfmiddlewaretoken={token}&n=3".encode()
        response, answer = await client.request(b"POST", base + "/form/", body, headers)
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/3/"]), answer[:500])
        forged = dict(headers, Origin="http://evil.example")
        response, _ = await client.request(b"POST", base + "/form/", body, forged)
        self.assertEqual(response.code, 403)                                # Django's own check

        response, body = await client.get(base + "/health")  # Django 404s it: TQServer answers
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(await stop_twistd(proc), 0)


KTOR_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>example</groupId>
  <artifactId>shop</artifactId>
  <version>1.0</version>
  <properties>
    <kotlin.version>2.4.21</kotlin.version>
    <kotlin.compiler.jvmTarget>17</kotlin.compiler.jvmTarget>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencyManagement>
    <dependencies>
      <dependency>
        <groupId>io.ktor</groupId><artifactId>ktor-bom</artifactId><version>3.5.2</version>
        <type>pom</type><scope>import</scope>
      </dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency><groupId>io.ktor</groupId><artifactId>ktor-server-netty-jvm</artifactId></dependency>
    <dependency><groupId>io.ktor</groupId><artifactId>ktor-server-core-jvm</artifactId></dependency>
    <dependency><groupId>org.jetbrains.kotlin</groupId><artifactId>kotlin-stdlib</artifactId><version>${kotlin.version}</version></dependency>
  </dependencies>
  <build>
    <sourceDirectory>src/main/kotlin</sourceDirectory>
    <plugins>
      <plugin>
        <groupId>org.jetbrains.kotlin</groupId><artifactId>kotlin-maven-plugin</artifactId>
        <version>${kotlin.version}</version>
        <executions><execution><id>compile</id><goals><goal>compile</goal></goals></execution></executions>
      </plugin>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-assembly-plugin</artifactId>
        <version>3.8.0</version>
        <configuration>
          <descriptorRefs><descriptorRef>jar-with-dependencies</descriptorRef></descriptorRefs>
          <archive><manifest><mainClass>shop.ApplicationKt</mainClass></manifest></archive>
        </configuration>
        <executions><execution><phase>package</phase><goals><goal>single</goal></goals></execution></executions>
      </plugin>
    </plugins>
  </build>
</project>
"""

KTOR_APP = """package shop

import io.ktor.http.ContentType
import io.ktor.server.application.call
import io.ktor.server.engine.embeddedServer
import io.ktor.server.netty.Netty
import io.ktor.server.request.header
import io.ktor.server.request.path
import io.ktor.server.request.receiveText
import io.ktor.server.response.respondRedirect
import io.ktor.server.response.respondText
import io.ktor.server.routing.get
import io.ktor.server.routing.post
import io.ktor.server.routing.route
import io.ktor.server.routing.routing

fun main() {
    val port = System.getenv("WORKER_PORT").toInt()
    embeddedServer(Netty, port = port, host = "127.0.0.1") {
        routing {
            route("/shop") {
                get("/health") { call.respondText("ok") }
                get("/") { call.respondText("ktor at ${call.request.path()}") }
                get("/go") { call.respondRedirect("/shop/items/7") }
                get("/items/{n}") {
                    val host = call.request.header("Host")
                    call.respondText("item ${call.parameters["n"]} host $host")
                }
                post("/echo") { call.respondText(call.receiveText(), ContentType.Text.Plain) }
            }
        }
    }.start(wait = true)
}
"""



class KtorTests(FrameworkBase):
    """A Ktor service as Ktor users write it: a Maven project (pom.xml, src/main/kotlin),
    Ktor and the Kotlin compiler from Maven Central, a fat jar from the assembly plugin.
    Its routes under route("/shop") with strip_prefix: false; an edit is rebuilt by Maven
    and swapped in while the old jar keeps serving."""

    def setUp(self):
        for tool in ("java", "mvn"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed (a JDK and Maven)")

    def test_ktor_maven_project_under_a_prefix_and_hot_reload(self):
        return d(self._ktor())

    async def _ktor(self):
        project = self.make_project(startup_timeout_ms=60000)
        project.write("workers/shop/config/worker.yaml",
                      "type: kotlin\nstrip_prefix: false\nhealth_path: /shop/health\n")
        project.write("workers/shop/pom.xml", KTOR_POM)
        source = project.write("workers/shop/src/main/kotlin/shop/Application.kt", KTOR_APP)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["shop"], timeout=500)
        base = project.url + "/shop"

        response, body = await client.get(base + "/")
        self.assertEqual((response.code, body[:16]), (200, b"ktor at /shop/"))
        response, _ = await client.get(base + "/go")
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/7"]))
        response, body = await client.get(base + "/items/7")
        self.assertEqual(body, f"item 7 host 127.0.0.1:{project.port}".encode())
        upload = b"k" * (1 << 20)
        response, body = await client.request(b"POST", base + "/echo", upload,
                                               {"Content-Type": "text/plain"})
        self.assertEqual((response.code, len(body)), (200, len(upload)))

        with open(source) as f:
            text = f.read()
        with open(source, "w") as f:
            f.write(text.replace('"ktor at ', '"ktor v2 at '))

        codes = []

        async def new_code():
            response, body = await client.get(base + "/")
            codes.append(response.code)
            return body.startswith(b"ktor v2 at /shop/")
        await wait_until(new_code, 300, "the edited Ktor app", proc)
        self.assertEqual(set(codes), {200})   # the old jar served while Maven built
        self.assertEqual(proc.text.count("built shop in"), 2)
        self.assertEqual(await stop_twistd(proc), 0)


class StartupFailureTests(FrameworkBase):
    """A Python worker that cannot start shows why on its routes (dev) and is reported as
    crash-looping; fixed, it serves."""

    def test_traceback_on_the_page_and_crash_loop_in_health(self):
        return d(self._startup_failure())

    async def _startup_failure(self):
        project = self.make_project(restart_backoff_min_ms=50, restart_backoff_max_ms=200)
        project.write("workers/app/src/main.py", "import no_such_module_here\n")
        proc = self.start(project)
        client = Client(self)

        async def crash_looping():
            _, health = await client.get_json(project.url + "/health")
            return health["workers"]["app"]["crash_loop"]

        await wait_until(crash_looping, 60, "crash_loop: true in /health", proc)
        response, page = await client.get(project.url + "/app/")
        self.assertEqual(response.code, 500)
        self.assertIn(b"Start failed", page)
        self.assertIn(b"ModuleNotFoundError", page)
        self.assertIn(b"no_such_module_here", page)

        project.write("workers/app/src/main.py", STARTUP_OK % 1)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        response, body = await client.get(project.url + "/app/")
        self.assertEqual(body, b"version 1")

        # New code that fails to start: the old keeps serving, the page says why.
        project.write("workers/app/src/main.py", "def broken(:\n")

        async def start_failed_page():
            response, page = await client.get(project.url + "/app/")
            return response.code == 500 and b"SyntaxError" in page

        await wait_until(start_failed_page, 60, "the SyntaxError on the page", proc)
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        self.assertEqual(len(status["workers"]["app"]["instances"]), 1)  # the old one

        project.write("workers/app/src/main.py", STARTUP_OK % 2)

        async def fixed():
            _, body = await client.get(project.url + "/app/")
            return body == b"version 2"

        await wait_until(fixed, 60, "version 2 served", proc)


class InstallTests(FrameworkBase):
    """A failed install is a failed build: the old code keeps serving, dev shows the
    installer's output. An edit made while an install runs is not lost."""

    def test_failed_install_then_edits_during_an_install(self):
        return d(self._install())

    async def _install(self):
        project = self.make_project()
        project.write("workers/deps/requirements.txt", "# nothing yet\n")
        project.write("workers/deps/src/main.py", STARTUP_OK % 1)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["deps"], timeout=300)
        url = project.url + "/deps/"

        project.write("workers/deps/requirements.txt", "flask==0.0.1\n")  # no such version

        async def failed_page():
            response, page = await client.get(url)
            return response.code == 500 and b"Build failed" in page

        await wait_until(failed_page, 120, "the failed install on the page", proc)
        _, page = await client.get(url)
        self.assertIn(b"flask", page)
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        deps = status["workers"]["deps"]
        self.assertEqual((deps["last_build"]["ok"], len(deps["instances"])), (False, 1))
        self.assertEqual(deps["instances"][0]["id"], "deps#1")  # the old code still runs

        # Fixed, and the code edited while that install runs: both end up served.
        project.write("workers/deps/requirements.txt", "itsdangerous\n")
        await sleep(0.2)
        project.write(
            "workers/deps/src/main.py",
            STARTUP_OK.replace("from tqserver", "import itsdangerous\nfrom tqserver") % 2,
        )

        async def served():
            _, body = await client.get(url)
            return body == b"version 2"

        await wait_until(served, 120, "version 2 (importing itsdangerous)", proc)


HONO_PACKAGE = {
    "name": "hono-app",
    "private": True,
    "type": "module",
    "dependencies": {"hono": "^4.6.0"},
}
HONO_APP = """
import { Hono } from "hono";

// Mounted as it would be behind any proxy that keeps the prefix: basePath, strip_prefix false.
const app = new Hono().basePath("/hono");
app.get("/health", (c) => c.text("ok"));
app.get("/", (c) => c.text("hono VERSION"));
app.get("/items/:id", (c) => c.json({ id: c.req.param("id") }));
app.post("/items", async (c) => c.json({ got: await c.req.json() }, 201));
app.get("/old", (c) => c.redirect("/hono/items/1"));

export default { port: Number(process.env.PORT), hostname: "127.0.0.1", fetch: app.fetch };
"""
PY_VERSION = """
from tqserver.worker import serve

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"py VERSION"]

serve(app)
"""


EXPRESS_APP = """
const express = require("express");

// As Express apps run behind a proxy that strips the prefix: routes at /, links and
// redirects built from X-Forwarded-Prefix, the client's scheme and host trusted from it.
const app = express();
app.set("trust proxy", "loopback");
app.use(express.json());
const prefix = (req) => req.get("X-Forwarded-Prefix") || "";
app.get("/health", (req, res) => res.send("ok"));
app.get("/", (req, res) =>
  res.type("text/plain").send(`express at ${req.path} ${prefix(req)} ${req.protocol}://${req.hostname} ${req.ip}`));
app.get("/items/:id", (req, res) => res.json({ id: req.params.id }));
app.post("/items", (req, res) => res.status(201).json({ got: req.body }));
app.get("/old", (req, res) => res.redirect(`${prefix(req)}/items/1`));
app.use(`/static`, express.static(__dirname + "/assets"));
app.listen(Number(process.env.PORT), "127.0.0.1");
"""


class ExpressTests(FrameworkBase):
    """Express from npm on Bun's node:http, behind the prefix TQServer strips: the
    X-Forwarded-* headers it sets are the ones Express's `trust proxy` reads, a JSON body
    and express.static work through the proxy."""

    def setUp(self):
        from .test_polyglot_integration import require_bun

        require_bun()

    def test_express_under_a_stripped_prefix(self):
        return d(self._express())

    async def _express(self):
        project = self.make_project()
        project.write("workers/shop/package.json", json.dumps(
            {"name": "shop", "private": True, "main": "server.js",
             "dependencies": {"express": "^4.21.0"}}))
        project.write("workers/shop/config/worker.yaml", "type: bun\nbun:\n  entrypoint: server.js\n")
        project.write("workers/shop/server.js", EXPRESS_APP)
        project.write("workers/shop/assets/logo.txt", "a logo\n")
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["shop"], timeout=400)
        base = project.url + "/shop"

        response, body = await client.get(base + "/")
        self.assertEqual((response.code, body),
                         (200, b"express at / /shop http://127.0.0.1 127.0.0.1"))
        response, body = await client.get(base + "/items/42")
        self.assertEqual(json.loads(body), {"id": "42"})
        response, body = await client.request(
            b"POST", base + "/items", b'{"a": [1, 2]}', {"Content-Type": "application/json"})
        self.assertEqual((response.code, json.loads(body)), (201, {"got": {"a": [1, 2]}}))
        response, _ = await client.get(base + "/old")
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/1"]))
        response, body = await client.get(base + "/static/logo.txt")
        self.assertEqual((response.code, body), (200, b"a logo\n"))
        self.assertEqual(await stop_twistd(proc), 0)


class HonoTests(FrameworkBase):
    """Hono on Bun, installed by `bun install` at start and again while the server runs;
    hot reload keeps working for every worker afterwards (the watcher never descends into
    node_modules, whose temporary directories come and go)."""

    def setUp(self):
        from .test_polyglot_integration import require_bun

        require_bun()

    def test_hono_and_hot_reload_across_bun_install(self):
        return d(self._hono())

    async def _hono(self):
        project = self.make_project()
        project.write(
            "workers/hono/config/worker.yaml",
            "type: bun\nstrip_prefix: false\nhealth_path: /hono/health\n",
        )
        project.write("workers/hono/package.json", json.dumps(HONO_PACKAGE))
        project.write("workers/hono/index.ts", HONO_APP.replace("VERSION", "v1"))
        project.write("workers/py/src/main.py", PY_VERSION.replace("VERSION", "v1"))
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["hono", "py"], timeout=400)
        base = project.url + "/hono"

        # The prefix is the app's own (basePath): /hono reaches it as it is, not redirected.
        response, body = await client.get(base)
        self.assertEqual((response.code, body), (200, b"hono v1"))
        response, body = await client.get(base + "/items/42")
        self.assertEqual(json.loads(body), {"id": "42"})
        response, body = await client.request(
            b"POST", base + "/items", b'{"a": [1, 2]}', {"Content-Type": "application/json"}
        )
        self.assertEqual((response.code, json.loads(body)), (201, {"got": {"a": [1, 2]}}))
        response, _ = await client.get(base + "/old")
        self.assertEqual(
            (response.code, response.headers.getRawHeaders("location")), (302, ["/hono/items/1"])
        )

        # A new dependency while the server runs: bun install again, into node_modules.
        package = dict(HONO_PACKAGE, dependencies={"hono": "^4.6.0", "ms": "^2.1.3"})
        project.write("workers/hono/package.json", json.dumps(package))
        ms = os.path.join(project.root, "workers", "hono", "node_modules", "ms", "package.json")
        await wait_until(lambda: d(self._exists(ms)), 300, "bun install of ms", proc)
        await self.wait_healthy(client, project, proc, ["hono", "py"], timeout=120)

        # Every worker still hot-reloads afterwards.
        project.write("workers/hono/index.ts", HONO_APP.replace("VERSION", "v2"))
        project.write("workers/py/src/main.py", PY_VERSION.replace("VERSION", "v2"))
        for url, want in [(base, b"hono v2"), (project.url + "/py/", b"py v2")]:
            await wait_until(
                lambda u=url, w=want: self._serves(client, u, w), 120, f"{want!r} at {url}", proc
            )
        _, health = await client.get_json(project.url + "/health")
        self.assertEqual(
            (health["watcher"]["status"], health["watcher"]["failures"]), ("watching", 0)
        )
        # Nothing under node_modules is watched: a handful of directories, not hundreds.
        watches = inotify_watches(proc.transport.pid)
        self.assertLess(watches, 15, "inotify watches of twistd")

    async def _exists(self, path):
        return os.path.exists(path)

    async def _serves(self, client, url, want):
        _, body = await client.get(url)
        return body == want


LOGIN_PHP = r"""<?php
// Like apps that honour X-Forwarded-Prefix and derive their cookie path from SCRIPT_NAME:
// with the prefix in both, the path was doubled (/admin/admin/) and login never stuck.
session_save_path(__DIR__ . '/../data');
$prefix = $_SERVER['HTTP_X_FORWARDED_PREFIX'] ?? '';
$path = $prefix . rtrim(dirname($_SERVER['SCRIPT_NAME']), '/') . '/';
session_set_cookie_params(['path' => $path]);
session_start();
if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $_SESSION['user'] = $_POST['user'] ?? '';
    header('Location: ' . strtok($_SERVER['REQUEST_URI'], '?'));
    exit;
}
header('Content-Type: text/plain');
echo isset($_SESSION['user']) ? "logged in as {$_SESSION['user']}" : 'login please';
"""


SYMFONY_PHP = r"""<?php
// A front controller on Symfony's HttpFoundation and Routing (Debian's packages), the
// request layer Symfony and Laravel apps are built on.
require "/usr/share/php/Symfony/Component/HttpFoundation/autoload.php";
require "/usr/share/php/Symfony/Component/Routing/autoload.php";

use Symfony\Component\HttpFoundation\Cookie;
use Symfony\Component\HttpFoundation\RedirectResponse;
use Symfony\Component\HttpFoundation\Request;
use Symfony\Component\HttpFoundation\Response;
use Symfony\Component\Routing\Exception\ResourceNotFoundException;
use Symfony\Component\Routing\Generator\UrlGenerator;
use Symfony\Component\Routing\Matcher\UrlMatcher;
use Symfony\Component\Routing\RequestContext;
use Symfony\Component\Routing\Route;
use Symfony\Component\Routing\RouteCollection;

$request = Request::createFromGlobals();
$routes = new RouteCollection();
$routes->add("home", new Route("/"));
$routes->add("item", new Route("/items/{n}", [], ["n" => "\d+"]));
$routes->add("go", new Route("/go"));
$routes->add("form", new Route("/form", [], [], [], "", [], ["POST"]));
$context = (new RequestContext())->fromRequest($request);
$urls = new UrlGenerator($routes, $context);
try {
    $route = (new UrlMatcher($routes, $context))->match($request->getPathInfo());
} catch (ResourceNotFoundException $e) {
    (new Response("no route for " . $request->getPathInfo(), 404))->send();
    exit;
}
switch ($route["_route"]) {
case "home":
    $response = new Response(sprintf("base=%s path=%s item=%s abs=%s uri=%s",
        $request->getBaseUrl(), $request->getPathInfo(), $urls->generate("item", ["n" => 7]),
        $urls->generate("item", ["n" => 7], UrlGenerator::ABSOLUTE_URL), $request->getUri()));
    break;
case "go":
    $response = new RedirectResponse($urls->generate("item", ["n" => 7]));
    break;
case "item":
    $response = new Response("item " . $route["n"] . " at " . $request->getPathInfo());
    break;
case "form":
    $response = new RedirectResponse($urls->generate("item", ["n" => (int) $request->request->get("n")]));
    $response->headers->setCookie(Cookie::create("seen", "yes", 0, $request->getBasePath() . "/"));
    break;
}
$response->headers->set("Content-Type", "text/plain");
$response->send();
"""

SYMFONY_AUTOLOAD = "/usr/share/php/Symfony/Component/HttpFoundation/autoload.php"


class SymfonyTests(FrameworkBase):
    """Symfony's HttpFoundation and Routing (Debian's php-symfony-* packages; Laravel's
    Illuminate\\Http\\Request is a Symfony Request) behind php-fpm at /shop, with no base
    URL configured: getBaseUrl, the generated paths and absolute URLs, redirects and a
    cookie scoped to the base path all carry the prefix once."""

    def setUp(self):
        from .php_support import require_php_fpm

        require_php_fpm()
        if not os.path.exists(SYMFONY_AUTOLOAD):
            raise unittest.SkipTest("php-symfony-http-foundation and php-symfony-routing "
                                    "(bin/install-toolchains --only php)")

    def test_symfony_front_controller_under_a_prefix(self):
        return d(self._symfony())

    async def _symfony(self):
        project = self.make_project()
        project.write("workers/shop/public/index.php", SYMFONY_PHP)
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["shop"])
        base = project.url + "/shop"

        response, body = await client.get(base + "/")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body.decode(), f"base=/shop path=/ item=/shop/items/7 "
                         f"abs={base}/items/7 uri={base}/")
        response, body = await client.get(base + "/items/7")
        self.assertEqual((response.code, body), (200, b"item 7 at /items/7"))
        response, _ = await client.get(base + "/go")
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/7"]))
        response, _ = await client.request(b"POST", base + "/form", b"n=3",
                                           {"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (302, ["/shop/items/3"]))
        self.assertEqual(cookie_of(response, "seen")[1].get("path"), "/shop/")
        response, body = await client.get(base + "/nothing/here")
        self.assertEqual((response.code, body), (404, b"no route for /nothing/here"))
        self.assertEqual(await stop_twistd(proc), 0)


class PhpPrefixTests(FrameworkBase):
    def setUp(self):
        from .php_support import require_php_fpm

        require_php_fpm()

    def test_cookie_path_from_the_prefix_is_not_doubled(self):
        return d(self._php())

    async def _php(self):
        project = self.make_project()
        project.write("workers/admin/public/index.php", LOGIN_PHP)
        os.makedirs(os.path.join(project.root, "workers", "admin", "data"))
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["admin"])
        base = project.url + "/admin/"
        response, body = await client.request(
            b"POST",
            base + "?next=1",
            b"user=ann",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(
            (response.code, response.headers.getRawHeaders("location")), (302, ["/admin/"]), body
        )
        session, attributes = cookie_of(response, "PHPSESSID")
        self.assertEqual(attributes.get("path"), "/admin/")
        # A browser sends the cookie back to /admin/ because its path covers it.
        response, body = await client.get(base, {"Cookie": f"PHPSESSID={session}"})
        self.assertEqual(body, b"logged in as ann")
