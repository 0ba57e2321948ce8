"""
``measuring-client`` on a terminal: a subprocess on a pseudo-terminal, and what the screen holds
once it has ended. A progress bar stops where the job stopped (cancelled, or Ctrl-C) and nothing
is printed onto a bar's line.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from typing import ClassVar

from measuring.client import Client
from measuring.test.e2e.test_cli import client_environment, command
from measuring.test.support import BASE, JOB_ID, PATIENCE, ServerTestCase

#: 48 partitions of a quarter of a second each: a few seconds of progress to watch.
CRAWL = """
import time


def crawl(df):
    def nap(part):
        time.sleep(0.25)
        return part

    return df.repartition(npartitions=48).map_partitions(nap).value.count()
"""
BAR = re.compile(r"crawl\.py: +(\d+)%\|.*\| *(\d+)/(\d+) ")
ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def screen(output: str) -> list[str]:
    """The lines a terminal shows after ``output`` (carriage returns, cursor up, erase line)."""
    lines, row, column, at = [""], 0, 0, 0
    while at < len(output):
        escape = ESCAPE.match(output, at)
        if escape:
            count, what = int(escape.group(1) or 1), escape.group(2)
            if what == "A":
                row = max(row - count, 0)
            elif what == "B":
                row += count
            elif what == "K":
                lines[row] = lines[row][:column]
            at = escape.end()
            lines += [""] * (row + 1 - len(lines))
            continue
        character = output[at]
        at += 1
        if character == "\r":
            column = 0
        elif character == "\n":
            row, column = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif character >= " ":
            line = lines[row].ljust(column)
            lines[row] = line[:column] + character + line[column + 1 :]
            column += 1
    return [line.rstrip() for line in lines if line.strip()]


class Terminal:
    """``measuring-client`` running on a pseudo-terminal of 120 columns; all it wrote."""

    def __init__(self, *arguments: str, **variables: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self._master = master
        self.process = subprocess.Popen(
            command(*arguments),
            env=client_environment(TERM="xterm", COLUMNS="120", **variables),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.output = ""

    def read(self, timeout: float = 0.1) -> None:
        """Take what the client wrote within ``timeout`` seconds."""
        ready, _, _ = select.select([self._master], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self._master, 65536).decode("utf-8", "replace")
            except OSError:  # the client has ended and closed its side
                time.sleep(timeout)

    def wait_for(self, pattern: re.Pattern[str], patience: float = PATIENCE) -> re.Match[str]:
        """Read until ``pattern`` appears in the output; its last match."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            self.read()
            found = list(pattern.finditer(self.output))
            if found:
                return found[-1]
            if self.process.poll() is not None:
                break
        raise AssertionError(f"{pattern.pattern!r} never appeared in:\n{self.output}")

    def end(self) -> int:
        """Read to the client's end; its exit code."""
        deadline = time.monotonic() + PATIENCE
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read()
        code = self.process.wait(timeout=PATIENCE)
        os.close(self._master)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class BarTests(ServerTestCase):
    """What a terminal shows of ``run`` when its job ends early, or is interrupted."""

    formulas: ClassVar[dict[str, str]] = {"crawl.py": CRAWL}

    def run_on_terminal(self) -> tuple[Terminal, Client, str]:
        """``run`` of crawl.py, once its bar shows some progress; and the job's id."""
        server = self.start()
        terminal = Terminal("--server", f"127.0.0.1:{server.port}", "run", self.folder, BASE,
                            "crawl.py")  # fmt: skip
        self.addCleanup(terminal.kill)
        api = Client("127.0.0.1", server.port)
        self.addCleanup(api.close)
        job = terminal.wait_for(re.compile(f"job ({JOB_ID.pattern})")).group(1)
        terminal.wait_for(re.compile(r"crawl\.py: +\d+%\|.*\| *[1-9]\d*/\d+ "))
        return terminal, api, job

    def assertStoppedBar(self, lines: list[str], job: str) -> tuple[int, int]:
        """The screen: the job's id alone on the first line, then its bar, short of the end."""
        self.assertEqual(lines[0], f"job {job}", lines)
        bar = BAR.match(lines[1])
        self.assertIsNotNone(bar, lines)
        assert bar is not None
        done, total = int(bar.group(2)), int(bar.group(3))
        self.assertLess(done, total, lines)
        self.assertNotEqual(bar.group(1), "100", lines)
        return done, total

    def test_cancelled(self) -> None:
        """Cancelled midway, the bar stays where the job stopped; the error has its own line."""
        terminal, api, job = self.run_on_terminal()
        self.assertEqual(api.job(job).cancel(), "cancelled")
        self.assertEqual(terminal.end(), 1, terminal.output)
        lines = screen(terminal.output)
        self.assertStoppedBar(lines, job)
        self.assertEqual(lines[2:], ["error: Cancelled: the job was cancelled"], lines)

    def test_interrupted(self) -> None:
        """Ctrl-C leaves the bar where it was and says how to stop the job, which runs on."""
        terminal, api, job = self.run_on_terminal()
        os.killpg(terminal.process.pid, signal.SIGINT)
        self.assertEqual(terminal.end(), 130, terminal.output)
        lines = screen(terminal.output)
        self.assertStoppedBar(lines, job)
        self.assertEqual(
            lines[2:],
            [f"interrupted: job {job} goes on (measuring-client job cancel {job} stops it)"],
            lines,
        )
        self.assertEqual(api.job(job).state, "running")
        self.assertEqual(api.job(job).cancel(), "cancelled")

    def test_done(self) -> None:
        """A job that ends done leaves its bar full, then the results below it."""
        server = self.start()
        terminal = Terminal("--server", f"127.0.0.1:{server.port}", "run", self.folder, BASE,
                            "crawl.py")  # fmt: skip
        self.addCleanup(terminal.kill)
        self.assertEqual(terminal.end(), 0, terminal.output)
        lines = screen(terminal.output)
        [job] = JOB_ID.findall(lines[0])
        self.assertEqual(lines[0], f"job {job}")
        bar = BAR.match(lines[1])
        self.assertIsNotNone(bar, lines)
        assert bar is not None
        self.assertEqual((bar.group(1), bar.group(2)), ("100", bar.group(3)), lines)
        self.assertTrue(lines[2].startswith(f"job {job}: done in "), lines)
