"""The status page in a real headless Chromium (driven over the W3C WebDriver protocol by
Debian's chromedriver): it shows every worker, and a click on one worker's Reload shows
that worker's new instance (pid) without the page being loaded again."""
from __future__ import annotations

import json
import os
import shutil

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from .support import Client, free_port, wait_until
from .test_cli_integration import LOUD_WORKER
from .test_integration import IntegrationBase, d

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Quiet(protocol.ProcessProtocol):
    def __init__(self) -> None:
        from twisted.internet import defer
        self.ended = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class StatusPageBrowserTests(IntegrationBase):
    def setUp(self):
        if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
            raise unittest.SkipTest("chromium and chromedriver (bin/install-toolchains)")

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

        port = free_port()
        driver = Quiet()
        reactor.spawnProcess(driver, CHROMEDRIVER, [CHROMEDRIVER, f"--port={port}"],
                             env=dict(os.environ))

        def stop_driver():
            if not driver.ended.called:
                driver.transport.signalProcess("KILL")
            return driver.ended
        self.addCleanup(stop_driver)
        wd = f"http://127.0.0.1:{port}"

        async def call(method, path, body=None):
            response, data = await client.request(
                method, wd + path, json.dumps(body or {}).encode() if method == b"POST" else b"",
                headers={"Content-Type": "application/json"}, timeout=60)
            value = json.loads(data)["value"]
            if isinstance(value, dict) and "error" in value:  # a WebDriver error
                raise AssertionError(f"{method.decode()} {path}: {value['error']}: "
                                     f"{value.get('message', '')[:300]}")
            return value

        async def up():
            value = await call(b"GET", "/status")
            return value.get("ready")
        await wait_until(up, 20, "chromedriver")
        options = {"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--user-data-dir=" + os.path.abspath(self.mktemp())]}
        session = await call(b"POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})
        sid = session["sessionId"]
        self.addCleanup(lambda: d(call(b"DELETE", f"/session/{sid}")))

        async def script(js):
            return await call(b"POST", f"/session/{sid}/execute/sync", {"script": js, "args": []})

        await call(b"POST", f"/session/{sid}/url", {"url": project.admin_url + "/_tqserver/"})

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
        button = await call(b"POST", f"/session/{sid}/element",
                            {"using": "css selector", "value": "button.reload[data-worker=app]"})
        element = next(iter(button.values()))
        await call(b"POST", f"/session/{sid}/element/{element}/click", {})

        async def new_pid_shown():
            pid = await script(pid_js)
            return pid not in (None, old_pid)
        await wait_until(new_pid_shown, 60, "the new app instance on the page", proc)
        self.assertTrue(await script("return window.sameDocument === true;"))
        _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        serving = [str(i["pid"]) for i in status["workers"]["app"]["instances"] if i["serving"]]
        self.assertNotIn(old_pid, serving)
