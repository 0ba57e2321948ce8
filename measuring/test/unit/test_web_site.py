"""
Tests for ``measuring.server.web``: the HTTP side through a real ``twisted.web`` Site on a free
loopback port, over the real dispatcher and scheduler (a fake worker pool whose jobs the test
settles, as in ``test_dispatch``): API paths to protocol requests and their answers, HTTP
statuses, tokens (Bearer, cookie, ``?token=``), refused cross-site POSTs and foreign Host names.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from measuring.errors import BadRequest, NotFound
from measuring.server.access import Tokens
from measuring.server.dispatch import Dispatcher
from measuring.server.web.access import next_page
from measuring.server.web.api import STATUSES, WrongMethod, protocol_request, slug
from measuring.server.web.metrics import MetricsPage, ServerCollector, registry
from measuring.server.web.site import site
from measuring.test.support import TOKEN, write_dataset, write_formulas
from measuring.test.unit.test_dispatch import Harness
from measuring.wire import CODES, INFO_REQUESTS


class Response:
    """What a request to the test's Site got back."""

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code, self.headers, self.body = code, headers, body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class NoWorkers:
    """A pool without worker processes, for /metrics."""

    def processes(self) -> list[Any]:
        return []


class ProtocolRequestTests(SynchronousTestCase):
    """``protocol_request``: each API path and query to the protocol request it stands for."""

    def test_paths(self) -> None:
        """Each path gives the protocol request of the same question."""
        job = "20261201-120000-abcdef"
        cases = {
            ("GET", "jobs"): {"Header": "Job", "Request": "List"},
            ("GET", f"jobs/{job}"): {"Header": "Job", "Request": "Status", "Job": job},
            ("GET", f"jobs/{job}/log"): {"Header": "Job", "Request": "Log", "Job": job},
            ("GET", f"jobs/{job}/results/peak"): {
                "Header": "Job", "Request": "Result", "Job": job, "Name": "peak",
            },
            ("POST", f"jobs/{job}/cancel"): {"Header": "Job", "Request": "Cancel", "Job": job},
        }  # fmt: skip
        for name in INFO_REQUESTS:
            cases[("GET", f"info/{slug(name)}")] = {"Header": "Info", "Request": name}
        for (method, path), expected in cases.items():
            self.assertEqual(protocol_request(method.encode(), path, {}), expected, path)

    def test_query(self) -> None:
        """Query parameters become their keys; numbers become numbers for the dispatcher."""
        self.assertEqual(
            protocol_request(b"GET", "jobs", {"state": ["done"], "limit": ["5"]}),
            {"Header": "Job", "Request": "List", "State": "done", "Limit": 5},
        )
        asked = protocol_request(b"GET", "jobs/x/results/r", {"offset": ["10"], "limit": ["a"]})
        self.assertEqual((asked["Offset"], asked["Limit"]), (10, "a"))

    def test_refused(self) -> None:
        """Unknown paths, parameters and methods are refused, saying what would do."""
        self.assertRaises(NotFound, protocol_request, b"GET", "nothing", {})
        error = self.assertRaises(BadRequest, protocol_request, b"GET", "jobs", {"sort": ["x"]})
        self.assertIn("state, limit", error.message)
        self.assertRaises(BadRequest, protocol_request, b"GET", "jobs", {"limit": ["1", "2"]})
        wrong = self.assertRaises(WrongMethod, protocol_request, b"GET", "jobs/x/cancel", {})
        self.assertEqual(wrong.allowed, b"POST")

    def test_everyCodeHasAStatus(self) -> None:
        """The table gives every protocol Code an HTTP status, and OK 200."""
        self.assertEqual(set(STATUSES), {"OK", *CODES})
        self.assertEqual(STATUSES["OK"], 200)

    def test_nextPage(self) -> None:
        """After the login, only a page of the dashboard is a place to go."""
        page = "#/jobs/20261201-120000-abcdef"
        self.assertEqual(next_page(page), b"./" + page.encode())
        for elsewhere in ("https://example.com/", "//example.com", "#/a b", None, ""):
            self.assertEqual(next_page(elsewhere), b"./")


class SiteCase(TestCase):
    """A Site on a free loopback port over ``Harness``'s dispatcher, with ``tokens``."""

    tokens: tuple[str, ...] = ()

    def setUp(self) -> None:
        roots = (self._folder(),)
        self.harness = h = Harness(self, roots=roots)
        self.dispatcher = Dispatcher(
            h.info, h.jobs, h.queries, h.stats, roots, (), Tokens(self.tokens)
        )
        collector = ServerCollector(h.stats, h.jobs, NoWorkers(), lambda: 0)
        web = site(self.dispatcher, MetricsPage(registry(collector)), self.tokens, True, reactor)
        listening: Any = reactor  # the installed reactor, a real one: IReactorTCP
        self.port: Any = listening.listenTCP(0, web, interface="127.0.0.1")
        self.number: int = self.port.getHost().port
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def _folder(self) -> str:
        import os

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        write_formulas(folder)
        write_dataset(folder)
        self.folder = folder
        return folder

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.number}"

    async def fetch(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> Response:
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await self.agent.request(method.encode(), (self.base + path).encode(), sent)
        body = await readBody(response)
        return Response(response.code, response.headers, body)

    def submit(self) -> str:
        """A job, queued and started on the fake pool; its id."""
        fields = {"Directory": self.folder, "Base": "time_series.parquet", "File": "work.py"}
        fields["Async"] = True
        answer = self.successResultOf(
            self.dispatcher.handle({"Header": "Dask", "Request": fields}, lambda line: None)
        )
        return str(answer["Job"])


class ApiTests(SiteCase):
    """The JSON API without tokens: the protocol's answers, with fitting statuses."""

    async def test_sameAnswers(self) -> None:
        """Each API answer is the dispatcher's answer to the same protocol request."""
        job = self.submit()
        for path, request in (
            ("/api/jobs", {"Header": "Job", "Request": "List"}),
            (f"/api/jobs/{job}", {"Header": "Job", "Request": "Status", "Job": job}),
            (f"/api/jobs/{job}/log", {"Header": "Job", "Request": "Log", "Job": job}),
            ("/api/info/status", {"Header": "Info", "Request": "Status"}),
        ):
            got = await self.fetch(path)
            expected = self.successResultOf(self.dispatcher.handle(request, lambda line: None))
            self.assertEqual((got.code, got.json()), (200, expected), path)
            self.assertEqual(got.header("content-type"), "application/json; charset=utf-8")

    async def test_cancel(self) -> None:
        """POST .../cancel cancels the job; GET is refused with 405 and Allow: POST."""
        job = self.submit()
        refused = await self.fetch(f"/api/jobs/{job}/cancel")
        self.assertEqual((refused.code, refused.header("allow")), (405, "POST"))
        self.assertEqual(refused.json()["Error"]["Code"], "BadRequest")
        cancelled = await self.fetch(f"/api/jobs/{job}/cancel", "POST")
        self.assertEqual(cancelled.code, 200)
        self.assertEqual(cancelled.json()["Response"], {"State": "cancelled"})

    async def test_errors(self) -> None:
        """Errors are the protocol's {"Code","Message"}, with the HTTP status of their Code."""
        missing = await self.fetch("/api/jobs/20261201-120000-abcdef")
        self.assertEqual(missing.code, 404)
        self.assertEqual(missing.json()["Error"]["Code"], "NotFound")
        wrong = await self.fetch("/api/jobs?limit=0")
        self.assertEqual(wrong.code, 400)
        message = wrong.json()["Error"]["Message"]
        self.assertIn('"Limit" must be a whole number from 1 to 1000', message)
        nowhere = await self.fetch("/api/nothing")
        self.assertEqual((nowhere.code, nowhere.json()["Header"]), (404, "Error"))

    async def test_securityHeaders(self) -> None:
        """Every response keeps out of frames and other sites' scripts, and sends no Referer."""
        for path in ("/", "/api/jobs", "/static/dashboard.js", "/metrics"):
            got = await self.fetch(path)
            self.assertEqual(got.code, 200, path)
            self.assertIn("frame-ancestors 'none'", got.header("content-security-policy") or "")
            self.assertEqual(got.header("x-content-type-options"), "nosniff")
            self.assertEqual(got.header("referrer-policy"), "no-referrer")

    async def test_crossSitePost(self) -> None:
        """A POST from another site's page is refused and does nothing."""
        job = self.submit()
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            got = await self.fetch(f"/api/jobs/{job}/cancel", "POST", headers)
            self.assertEqual(got.code, 403, headers)
            self.assertEqual(got.json()["Error"]["Code"], "Forbidden")
        self.assertIsNone(self.harness.pool.runs[0].killed_with)
        same = {"Origin": self.base, "Sec-Fetch-Site": "same-origin"}
        got = await self.fetch(f"/api/jobs/{job}/cancel", "POST", same)
        self.assertEqual(got.code, 200)

    async def test_foreignHost(self) -> None:
        """Without tokens, a request naming a host other than loopback is refused (rebinding)."""
        got = await self.fetch("/api/jobs", headers={"Host": "attacker.example"})
        self.assertEqual(got.code, 403)
        self.assertIn("attacker.example", got.json()["Error"]["Message"])
        for host in ("localhost", "127.0.0.1", "[::1]"):
            named = {"Host": f"{host}:{self.number}"}
            got = await self.fetch("/api/jobs", headers=named)
            self.assertEqual(got.code, 200, host)

    async def test_static(self) -> None:
        """The page, its script and the vendored chart library and its licence are served."""
        page = await self.fetch("/")
        self.assertIn(b"static/vendor/uPlot.iife.min.js", page.body)
        library = await self.fetch("/static/vendor/uPlot.iife.min.js")
        self.assertEqual(library.header("content-type"), "text/javascript; charset=utf-8")
        self.assertTrue(library.body.startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32)"))
        licence = await self.fetch("/static/vendor/uPlot.LICENSE")
        self.assertIn(b"MIT License", licence.body)


class TokenTests(SiteCase):
    """With a token file: Bearer, the cookie, ?token=, the login form; refusals otherwise."""

    tokens = (TOKEN,)

    async def test_withoutToken(self) -> None:
        """No token, or a wrong one: the API and /metrics say Unauthorized; pages go to login."""
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}):
            for path in ("/api/jobs", "/metrics"):
                got = await self.fetch(path, headers=headers)
                self.assertEqual(got.code, 401, (path, headers))
                self.assertEqual(got.json()["Error"]["Code"], "Unauthorized")
            page = await self.fetch("/", headers=headers)
            self.assertEqual((page.code, page.header("location")), (303, "/login"))
        # The login form and the page's own files need no token.
        self.assertEqual((await self.fetch("/login")).code, 200)
        self.assertEqual((await self.fetch("/static/dashboard.css")).code, 200)

    async def test_bearer(self) -> None:
        """A Bearer token is enough, for the API, the page and /metrics."""
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/api/jobs", "/", "/metrics"):
            self.assertEqual((await self.fetch(path, headers=bearer)).code, 200, path)

    async def test_tokenInLink(self) -> None:
        """/?token= sets an HttpOnly, SameSite=Strict cookie and redirects without the token."""
        got = await self.fetch(f"/?token={TOKEN}")
        self.assertEqual((got.code, got.header("location")), (303, "/"))
        cookie = got.header("set-cookie") or ""
        self.assertIn("HttpOnly", cookie)
        self.assertIn("samesite=strict", cookie.lower())
        self.assertNotIn(TOKEN, cookie)
        pair = cookie.split(";")[0]
        with_cookie = await self.fetch("/api/jobs?limit=1", headers={"Cookie": pair})
        self.assertEqual(with_cookie.code, 200)
        kept = await self.fetch(f"/api/jobs?token={TOKEN}&limit=1")
        self.assertEqual(kept.header("location"), "/api/jobs?limit=1")
        forged = await self.fetch("/api/jobs", headers={"Cookie": pair.split("=")[0] + "=0" * 64})
        self.assertEqual(forged.code, 401)

    async def test_login(self) -> None:
        """The form's POST with a right token logs in; a wrong one is 401 and sets nothing."""
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        wrong = await self.post_form("token=not-the-token-at-all&next=%23%2F", form)
        self.assertEqual(wrong.code, 401)
        self.assertIsNone(wrong.header("set-cookie"))
        right = await self.post_form(f"token={TOKEN}&next=%23%2Fjobs%2Fx", form)
        self.assertEqual((right.code, right.header("location")), (303, "./#/jobs/x"))
        self.assertIn("HttpOnly", right.header("set-cookie") or "")

    async def post_form(self, body: str, headers: dict[str, str]) -> Response:
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        sent = Headers({k: [v] for k, v in headers.items()})
        response = await self.agent.request(
            b"POST", (self.base + "/login").encode(), sent, FileBodyProducer(BytesIO(body.encode()))
        )
        return Response(response.code, response.headers, await readBody(response))
