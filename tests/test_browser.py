"""TQServer's pages in a real headless Chromium, driven over the W3C WebDriver protocol by
Debian's chromedriver: the status page (every worker shown; a click on one worker's
Reload shows its new instance without the page being loaded again) and the dev edit loop
(a saved source file reloads the open page by itself)."""
from __future__ import annotations

import json
import os
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .support import Client, free_port, wait_until
from .test_cli_integration import LOUD_WORKER
from .test_integration import HTML_WORKER, IntegrationBase, d

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class _Ended(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class Browser:
    """One chromedriver and one headless Chromium session, ended by the test's cleanup."""

    def __init__(self, testcase, client: Client) -> None:
        self.testcase = testcase
        self.client = client
        self.wd = ""
        self.sid = ""

    async def start(self) -> Browser:
        port = free_port()
        driver = _Ended()
        reactor.spawnProcess(driver, CHROMEDRIVER, [CHROMEDRIVER, f"--port={port}"],
                             env=dict(os.environ))

        def stop_driver():
            if not driver.ended.called:
                driver.transport.signalProcess("KILL")
            return driver.ended
        self.testcase.addCleanup(stop_driver)
        self.wd = f"http://127.0.0.1:{port}"

        async def up():
            return (await self.call(b"GET", "/status")).get("ready")
        await wait_until(up, 20, "chromedriver")
        options = {"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--user-data-dir=" + os.path.abspath(self.testcase.mktemp())]}
        session = await self.call(b"POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})
        self.sid = session["sessionId"]
        self.testcase.addCleanup(lambda: d(self.call(b"DELETE", f"/session/{self.sid}")))
        return self

    async def call(self, method: bytes, path: str, body=None):
        """A WebDriver command's value; a WebDriver error fails the test with its message."""
        response, data = await self.client.request(
            method, self.wd + path, json.dumps(body or {}).encode() if method == b"POST" else b"",
            headers={"Content-Type": "application/json"}, timeout=60)
        value = json.loads(data)["value"]
        if isinstance(value, dict) and "error" in value:
            raise AssertionError(f"{method.decode()} {path}: {value['error']}: "
                                 f"{value.get('message', '')[:300]}")
        return value

    async def open(self, url: str) -> None:
        await self.call(b"POST", f"/session/{self.sid}/url", {"url": url})

    async def before_each_page(self, js: str) -> None:
        """Run ``js`` in every document before its own scripts (Chrome DevTools)."""
        await self.call(b"POST", f"/session/{self.sid}/goog/cdp/execute", {
            "cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": js}})

    async def script(self, js: str):
        return await self.call(b"POST", f"/session/{self.sid}/execute/sync",
                               {"script": js, "args": []})

    async def click(self, css: str) -> None:
        found = await self.call(b"POST", f"/session/{self.sid}/element",
                                {"using": "css selector", "value": css})
        element = next(iter(found.values()))
        await self.call(b"POST", f"/session/{self.sid}/element/{element}/click", {})


class BrowserBase(IntegrationBase):
    def setUp(self):
        if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
            raise unittest.SkipTest("chromium and chromedriver (bin/install-toolchains)")


class StatusPageBrowserTests(BrowserBase):
    def test_reload_button_shows_the_new_instance(self):
        return d(self._reload())

    async def _reload(self):
        project = self.make_project()
        for name in ("app", "api"):
            project.write(f"workers/{name}/src/main.py", LOUD_WORKER)
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app", "api"], timeout=60)
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        old_pid = str(status["workers"]["app"]["instances"][0]["pid"])
        self.assertEqual(status["ready"], {"status": "ready", "waiting_for": []})

        browser = await Browser(self, client).start()
        script = browser.script
        await browser.open(project.admin_url + "/_tqserver/")

        async def workers_shown():
            names = await script("return [...document.querySelectorAll('section[data-worker]')]"
                                 ".map(s => s.dataset.worker)")
            return sorted(names) == ["api", "app"]
        await wait_until(workers_shown, 20, "both workers on the page", proc)
        self.assertEqual(await script("return document.getElementById('ready').textContent"),
                         "ready")
        await script("window.sameDocument = true;"
                     " window.button = document.querySelector('button.reload[data-worker=app]');"
                     " window.shown = document.getElementById('meta').textContent;")

        async def rendered_again():
            return await script("return document.getElementById('meta').textContent"
                                " !== window.shown;")
        await wait_until(rendered_again, 20, "the next snapshot on the page", proc)
        # The button a user is pressing survives the re-render (or the click is lost).
        self.assertTrue(await script("return window.button.isConnected;"))
        pid_js = ("const c = document.querySelector('section[data-worker=app] td.pid');"
                  " return c ? c.textContent : null;")
        self.assertEqual(await script(pid_js), old_pid)
        await browser.click("button.reload[data-worker=app]")

        async def new_pid_shown():
            pid = await script(pid_js)
            return pid not in (None, old_pid)
        await wait_until(new_pid_shown, 60, "the new app instance on the page", proc)
        self.assertTrue(await script("return window.sameDocument === true;"))
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        serving = [str(i["pid"]) for i in status["workers"]["app"]["instances"] if i["serving"]]
        self.assertNotIn(old_pid, serving)


class LiveReloadBrowserTests(BrowserBase):
    def test_a_saved_file_reloads_the_open_page(self):
        return d(self._live_reload())

    async def _live_reload(self):
        project = self.make_project()
        main = project.write("workers/app/src/main.py", HTML_WORKER)
        proc = self.start(project)                      # dev mode: the reload script
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        browser = await Browser(self, client).start()
        # Keep the page's EventSources in sight, to know when its stream is connected.
        await browser.before_each_page(
            "window.streams = []; const Native = window.EventSource;"
            " window.EventSource = function (url) {"
            " const s = new Native(url); window.streams.push(s); return s; };")
        await browser.open(project.url + "/app/page")
        body_js = "return document.body ? document.body.textContent : '';"
        self.assertTrue((await browser.script(body_js)).startswith("page /page /app"))
        await browser.script("window.untouched = true;")

        async def live():  # the page's live-reload stream is open (the server has it)
            return await browser.script(
                "return window.streams.length === 1 && window.streams[0].readyState === 1"
                " && window.streams[0].url.endsWith('/_tqserver/events');")
        await wait_until(live, 20, "the page's live-reload stream", proc)
        with open(main) as f:
            text = f.read()
        with open(main, "w") as f:
            f.write(text.replace("page %s", "edited %s"))

        async def reloaded():
            return (await browser.script(body_js)).startswith("edited /page /app")
        await wait_until(reloaded, 60, "the page reloaded with the new code", proc)
        # reloaded by the page itself (a new document), not by the test
        self.assertIsNone(await browser.script("return window.untouched === undefined ? null"
                                               " : window.untouched;"))
