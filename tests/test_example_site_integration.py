"""The example site as `bin/example` runs it: every worker under workers/ with the shipped
etc/server.yaml, `twistd -n tqserver` on a project with no run/ nor logs/ (a fresh
clone), the control plane on its default Unix socket. Each route of the README's table
answers, and `tqserver status` reaches the server through that socket. (Test helpers set
things up that a fresh clone has not: `twistd -n` once died there before serving.)"""
from __future__ import annotations

import json
import os
import shutil

from .php_support import require_php_fpm
from .support import REPO, Client, Project, kill_leftovers, short_dir, stop_twistd, wait_until
from .test_cli_integration import tqserver
from .test_frameworks_integration import FrameworkBase
from .test_integration import d
from .test_polyglot_integration import require_bun, require_kotlin


class ExampleSiteAsShippedTests(FrameworkBase):
    def setUp(self):
        require_php_fpm()
        require_bun()
        require_kotlin()

    def test_every_example_worker_answers_on_a_fresh_clone(self):
        return d(self._site())

    async def _site(self):
        project = Project(short_dir(self))
        self.addCleanup(kill_leftovers, project.root)
        shutil.copy(os.path.join(REPO, "etc", "server.yaml"),
                    os.path.join(project.root, "etc", "server.yaml"))
        for name in sorted(os.listdir(os.path.join(REPO, "workers"))):
            project.copy_worker(name)
        proc = self.start(project, "--listen", f"tcp:{project.port}:interface=127.0.0.1",
                          make_dirs=False)
        client = Client(self)

        async def healthy():
            _, body = await client.get_json(project.url + "/health")
            return body["status"] == "healthy"
        await wait_until(healthy, 500, "every example worker healthy", proc)

        expected = {
            "/": b"TQServer",
            "/hello/": b"Hello from Go!",
            "/flask/": b'action="/flask/notes"',
            "/api/items": b"[",
            "/blog/": b"/blog/post/",
            "/echo/": b'"x-forwarded-prefix": "/echo"',
            "/kotlin/": b"Kotlin",
        }
        for path, snippet in expected.items():
            response, body = await client.get(project.url + path)
            self.assertEqual(response.code, 200, (path, body[:300]))
            self.assertIn(snippet, body, path)

        sock = os.path.join(project.root, "run", "tqserver-admin.sock")
        self.assertTrue(os.path.exists(sock))
        code, out, err = await tqserver(project.root, "status", "--json")
        self.assertEqual(code, 0, err)
        workers = json.loads(out)["workers"]
        self.assertEqual(sorted(workers), sorted(os.listdir(os.path.join(REPO, "workers"))))
        self.assertEqual({w["status"] for w in workers.values()}, {"healthy"})
        self.assertEqual(await stop_twistd(proc), 0)
