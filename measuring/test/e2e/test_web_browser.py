"""
The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against the real ``twistd -n measuring --http`` running
real jobs. Skipped, saying why, only where the browser is not installed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from measuring.test.support import (
    PATIENCE,
    TOKEN,
    ClientTestCase,
    write_dataset,
    write_formulas,
    write_token_file,
)
from measuring.test.support.web import browser_missing, chromium, http_port

#: Files of the dataset watched.py runs over: 1.5 s in each, long enough to watch.
PARTS = 40
#: The server reads small files as one partition: the formula splits it, a task per file.
WATCHED = f"""
import time


def slow(df):
    def nap(part):
        time.sleep(1.5)
        return part

    return df.repartition(npartitions={PARTS}).map_partitions(nap).value.count()
"""


class BrowserTests(ClientTestCase):
    """The dashboard as a person sees it."""

    skip = browser_missing()

    def setUp(self) -> None:
        super().setUp()
        folder = os.path.join(self.folder, "parts")
        os.makedirs(folder)
        for part in range(PARTS):
            rows = self.frame.iloc[part * 100 : (part + 1) * 100]
            write_dataset(folder, name=f"part-{part:02d}.parquet", frame=rows)
        write_formulas(self.folder, WATCHED, name="watched.py")
        token_file = write_token_file(self.folder)
        self.server = self.start("--http", "tcp:0:interface=127.0.0.1", "--token-file", token_file)
        self.port = http_port(self.server)
        self.browser = chromium(os.path.abspath(self.mktemp()))
        self.addCleanup(self.browser.quit)
        # Opening a link with the token logs the browser in, as measuring-client dashboard's does.
        self.browser.get(f"http://127.0.0.1:{self.port}/?token={TOKEN}")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.server.ask({**request, "Token": TOKEN})

    def js(self, script: str) -> Any:
        return self.browser.execute_script(script)

    def until(self, script: str, what: str, patience: float = PATIENCE) -> Any:
        """Run ``script`` in the page until it gives something true; that value."""
        return self.wait_for(lambda: self.js(script), what, patience)

    def errors(self) -> list[dict[str, Any]]:
        """What the page's console said at the level of an error."""
        return [entry for entry in self.browser.get_log("browser") if entry["level"] == "SEVERE"]

    def test_liveJobs(self) -> None:
        """A running job's progress moves on the page; its Cancel button stops it."""
        job = self.ask(self.dask(Base="parts", File="watched.py", Async=True))["Job"]
        self.assertEqual(self.browser.current_url, f"http://127.0.0.1:{self.port}/")
        row = f"document.querySelector('#running tr[data-key=\"{job}\"]')"
        first = int(self.until(f"return {row} && {row}.dataset.done", "progress on the page"))
        later = self.until(
            f"const d = {row} && {row}.dataset.done; return d && +d > {first} && d",
            "the progress to move",
        )
        self.assertGreater(int(later), first)
        self.assertIn(
            "tasks", self.js(f"return {row}.querySelector('.progress .label').textContent")
        )
        button = self.browser.find_element("css selector", f'button.cancel[data-job="{job}"]')
        button.click()
        self.assertEqual(button.text, "Confirm cancel")
        button.click()
        status = self.wait_for_state(job, "cancelled")
        self.assertEqual(status["Error"]["Code"], "Cancelled")
        recent = f"document.querySelector('#recent tr[data-key=\"{job}\"] .state')"
        self.until(
            f"return {recent} && {recent}.textContent === 'cancelled'", "it listed cancelled"
        )
        self.assertEqual(self.errors(), [])

    def wait_for_state(self, job: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.ask({"Header": "Job", "Request": "Status", "Job": job})["Response"]
            return status if status["State"] == state else None

        result: dict[str, Any] = self.wait_for(reached, f"job {job} to be {state}")
        return result

    def test_jobPage(self) -> None:
        """A finished job's page draws a chart per numeric column, with a point per row."""
        answer = self.ask(self.dask(Async=False))
        self.assertEqual(answer["Status"], "OK", answer)
        job, results = answer["Job"], answer["Response"]["Results"]
        self.browser.get(f"http://127.0.0.1:{self.port}/#/jobs/{job}")
        charts = self.until(
            f"if (document.getElementById('job-results').dataset.rendered !== '{job}') return;"
            "const c = [...document.querySelectorAll('.chart[data-points]')];"
            "return c.map(e => [e.closest('.result').dataset.result,"
            " e.dataset.column, e.dataset.kind, e.uplot.data[0].length, e.uplot.data[1].length,"
            " e.querySelectorAll('canvas').length])",
            "the result charts",
        )
        drawn = {(result, column): (kind, xs, ys, canvases)
                 for result, column, kind, xs, ys, canvases in charts}  # fmt: skip
        hourly = results["hourly"]["Rows"]
        self.assertEqual(drawn[("hourly", "value")], ("lines", hourly, hourly, 1))
        self.assertEqual(drawn[("mean_by_sensor", "value")], ("bars", 3, 3, 1))
        # One chart per numeric column: a count does not flatten a mean.
        self.assertEqual(
            {column for result, column in drawn if result == "stats"},
            {"count", "mean", "min", "max"},
        )
        shown = self.js("return document.querySelector('[data-result=peak] .scalar').textContent")
        self.assertLess(abs(float(shown) - results["peak"]["Value"]), 1e-3)  # 6 digits shown
        time.sleep(0.5)  # the charts' last resize
        shot = os.path.join(self.folder, "job.png")
        self.assertTrue(self.browser.save_screenshot(shot))
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(self.errors(), [])
