"""
The HTTP side of the real ``twistd -n measuring --http``: the JSON API answers as the TCP
protocol does for the same job, /metrics counts jobs as they run and fail, and tokens guard it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from measuring.local import environment
from measuring.test.support import TOKEN, ClientTestCase, write_token_file
from measuring.test.support.web import fetch, http_port, metric_samples

BEARER = {"Authorization": f"Bearer {TOKEN}"}


class WebTests(ClientTestCase):
    """A server with a token file and --http on a free loopback port."""

    def setUp(self) -> None:
        super().setUp()
        self.server = self.start(
            "--http", "tcp:0:interface=127.0.0.1", "--token-file", write_token_file(self.folder)
        )
        self.port = http_port(self.server)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The TCP protocol's answer, with the token."""
        return self.server.ask({**request, "Token": TOKEN})

    def api(self, path: str, method: str = "GET") -> Any:
        reply = fetch(self.port, path, method, BEARER)
        return reply.code, reply.json()

    def test_sameAnswersAsTcp(self) -> None:
        """Every /api/ answer about a finished job equals the TCP protocol's, byte for byte."""
        answer = self.ask(self.dask(Async=False))
        self.assertEqual(answer["Status"], "OK", answer)
        job = answer["Job"]
        paths = {
            f"/api/jobs/{job}": {"Header": "Job", "Request": "Status", "Job": job},
            f"/api/jobs/{job}/log": {"Header": "Job", "Request": "Log", "Job": job},
            "/api/jobs?state=done&limit=5": {
                "Header": "Job", "Request": "List", "State": "done", "Limit": 5,
            },
            f"/api/jobs/{job}/cancel": {"Header": "Job", "Request": "Cancel", "Job": job},
            "/api/jobs/20200101-000000-000000": {
                "Header": "Job", "Request": "Status", "Job": "20200101-000000-000000",
            },
        }  # fmt: skip
        for name, entry in answer["Response"]["Results"].items():
            request = {"Header": "Job", "Request": "Result", "Job": job, "Name": name}
            paths[f"/api/jobs/{job}/results/{name}?offset=3&limit=7"] = {
                **request, "Offset": 3, "Limit": 7,
            }  # fmt: skip
            if entry["Kind"] != "Scalar":
                self.assertGreater(entry["Rows"], 0)
        for path, request in paths.items():
            code, got = self.api(path, "POST" if path.endswith("/cancel") else "GET")
            self.assertEqual(got, self.ask(request), path)
            self.assertEqual(code, 404 if "20200101" in path else 200, path)
        code, status = self.api("/api/info/status")
        self.assertEqual(code, 200)
        self.assertEqual(set(status["Response"]), set(self.ask(STATUS)["Response"]))
        self.assertEqual(status["Response"]["Dashboard"], f"http://127.0.0.1:{self.port}/")

    def test_metricsMove(self) -> None:
        """/metrics counts the jobs that ran and failed, and the requests, as they happen."""
        before = metric_samples(fetch(self.port, "/metrics", headers=BEARER).body.decode())
        self.assertEqual(self.ask(self.dask("peak", Async=False))["Status"], "OK")
        failed = self.ask(self.dask(File="bad.py", Async=False))
        self.assertEqual(failed["Error"]["Code"], "JobFailed", failed)
        after = metric_samples(fetch(self.port, "/metrics", headers=BEARER).body.decode())

        def moved(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after[key] - before.get(key, 0.0)

        self.assertEqual(moved("measuring_jobs_total", state="done"), 1)
        self.assertEqual(moved("measuring_jobs_total", state="failed"), 1)
        self.assertEqual(moved("measuring_jobs_total", state="running"), 2)
        self.assertEqual(moved("measuring_job_duration_seconds_count"), 2)
        self.assertEqual(moved("measuring_requests_total", header="Dask", code="OK"), 1)
        self.assertEqual(moved("measuring_requests_total", header="Dask", code="JobFailed"), 1)
        self.assertEqual(after[("measuring_jobs_current", (("state", "running"),))], 0)
        workers = sum(v for (name, _), v in after.items() if name == "measuring_workers")
        self.assertGreaterEqual(workers, 1)

    def test_tokens(self) -> None:
        """No token or a wrong one: 401; Bearer, or the cookie a ?token= link sets: served."""
        self.assertEqual(fetch(self.port, "/api/jobs").code, 401)
        wrong = fetch(self.port, "/metrics", headers={"Authorization": "Bearer " + "x" * 32})
        self.assertEqual((wrong.code, wrong.json()["Error"]["Code"]), (401, "Unauthorized"))
        self.assertEqual(fetch(self.port, "/").headers["Location"], "/login")
        link = fetch(self.port, f"/?token={TOKEN}")
        self.assertEqual((link.code, link.headers["Location"]), (303, "/"))
        cookie = link.headers["Set-Cookie"].split(";")[0]
        self.assertEqual(fetch(self.port, "/", headers={"Cookie": cookie}).code, 200)
        job = self.ask(self.dask("peak", Async=True))["Job"]
        forged = fetch(self.port, f"/api/jobs/{job}/cancel", "POST",
                       {"Cookie": cookie, "Origin": "http://evil.example"})  # fmt: skip
        self.assertEqual(forged.code, 403)
        self.assertIn("another site", self.server.log())

    def test_dashboardCommand(self) -> None:
        """``measuring-client dashboard`` prints the address that logs a browser in."""
        token_file = write_token_file(self.folder, name="client-token")
        printed = subprocess.run(
            [sys.executable, "-m", "measuring.client.cli", "--server",
             f"127.0.0.1:{self.server.port}", "--token-file", token_file, "dashboard"],
            env=environment(), capture_output=True, text=True, timeout=60, cwd=self.folder,
        )  # fmt: skip
        self.assertEqual(printed.returncode, 0, printed.stderr)
        url = printed.stdout.strip()
        self.assertEqual(url, f"http://127.0.0.1:{self.port}/?token={TOKEN}")
        self.assertEqual(fetch(self.port, url.split(str(self.port), 1)[1]).code, 303)


class WithoutHttpTests(ClientTestCase):
    """--http is off by default; beyond loopback it needs a token, as --port does."""

    def test_offByDefault(self) -> None:
        """Without --http, Status says there is no dashboard and the client says how to get one."""
        server = self.start()
        self.assertIsNone(self.info(server, "Status")["Dashboard"])
        printed = subprocess.run(
            [sys.executable, "-m", "measuring.client.cli", "--server",
             f"127.0.0.1:{server.port}", "dashboard"],
            env=environment(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(printed.returncode, 2)
        self.assertIn("--http", printed.stderr)

    def test_beyondLoopbackNeedsToken(self) -> None:
        """--http on every interface without a token file does not start, saying why."""
        from measuring.test.support import run_twistd

        ran = run_twistd(self.folder, "--http", "tcp:0", "--data-root", self.folder,
                         "--state-dir", os.path.join(self.folder, "state"))  # fmt: skip
        self.assertNotEqual(ran.returncode, 0)
        self.assertIn("--http 'tcp:0' can be reached from other machines", ran.stdout + ran.stderr)

    def test_jsonLog(self) -> None:
        """--log-format json: every line of the log is one JSON event."""
        server = self.start("--log-format", "json")
        server.ask(STATUS)
        server.stop()
        lines = [line for line in server.log().splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]
        said = [event.get("text", "") for event in events]
        self.assertTrue(any(text.startswith("measuring listening on") for text in said), said)
        self.assertTrue(all("log_level" in event for event in events))


STATUS = {"Header": "Info", "Request": "Status"}
