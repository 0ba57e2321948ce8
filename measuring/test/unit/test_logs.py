"""
Tests for ``measuring.server.logs``: the JSON format, the journal's level prefixes, and when
twistd's own text log is left as it is.
"""

from __future__ import annotations

import json
import os
import tempfile

from twisted.logger import LogLevel, eventFromJSON
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from measuring.server import logs


def event(level: LogLevel = LogLevel.info, text: str = "job {job} queued") -> dict[str, object]:
    return {"log_format": text, "job": "20261201-120000-abcdef", "log_level": level,
            "log_time": 1764590400.0, "log_namespace": "measuring.server.jobs"}  # fmt: skip


class FormatTests(SynchronousTestCase):
    """One event as the log writes it."""

    def test_json(self) -> None:
        """json: one line of twisted.logger JSON per event, read back as the same event."""
        line = logs.formatter("json", journal=False)(event())
        assert line is not None
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        back = eventFromJSON(line)
        self.assertEqual(back["job"], "20261201-120000-abcdef")
        self.assertEqual(back["log_level"], LogLevel.info)

    def test_journal(self) -> None:
        """On the journal every line starts with the level's syslog priority."""
        warned = logs.formatter("text", journal=True)(event(LogLevel.warn, "one\ntwo"))
        assert warned is not None
        self.assertEqual([line[:3] for line in warned.splitlines()], ["<4>", "<4>"])
        as_json = logs.formatter("json", journal=True)(event(LogLevel.error))
        assert as_json is not None
        self.assertTrue(as_json.startswith("<3>{"))
        json.loads(as_json[3:])

    def test_onJournal(self) -> None:
        """The journal is recognised by the device and inode $JOURNAL_STREAM names."""
        with tempfile.TemporaryFile("w") as stream:
            status = os.fstat(stream.fileno())
            named = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
            self.assertTrue(logs.on_journal(stream, named))
            self.assertFalse(logs.on_journal(stream, {}))
            self.assertFalse(logs.on_journal(stream, {"JOURNAL_STREAM": "1:2"}))


class ChooseTests(SynchronousTestCase):
    """Which observer twistd is given."""

    def test_textLeftAlone(self) -> None:
        """text, off the journal: twistd's own log, unchanged."""
        self.assertIsNone(logs.choose("text", {"nodaemon": True}, {}))

    def test_json(self) -> None:
        """json: twistd is told to call ``observer``, which writes JSON lines."""
        self.assertEqual(logs.choose("json", {"nodaemon": True}, {}), logs.OBSERVER)

    def test_jsonNotToSyslog(self) -> None:
        """json with --syslog is refused, saying why."""
        error = self.assertRaises(UsageError, logs.choose, "json", {"syslog": True}, {})
        self.assertIn("--syslog", str(error))
