"""The systemd unit: ``systemd-analyze verify`` finds no problem in it."""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT, twistd

UNIT = os.path.join(PACKAGE_ROOT, "tcp_server.service")


class UnitTests(SynchronousTestCase):
    """tcp_server.service as shipped."""

    def setUp(self) -> None:
        if not os.path.exists(UNIT):
            raise SkipTest(f"no tcp_server.service beside {PACKAGE_ROOT} (not a repository)")
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        self.analyze = analyze
        with open(UNIT) as f:
            self.text = f.read()

    def test_verify(self) -> None:
        """The unit verifies clean once ExecStart points at a twistd that exists on this machine."""
        [command] = twistd()[:1]
        if not os.path.basename(command) == "twistd":
            raise SkipTest("no twistd script beside this Python")
        folder = self.mktemp()
        os.makedirs(folder)
        unit = os.path.join(folder, "tcp_server.service")
        with open(unit, "w") as f:
            f.write(self.text.replace("/opt/measuring/bin/twistd", command))
        result = subprocess.run(
            [self.analyze, "verify", unit], capture_output=True, text=True, timeout=120
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_startsTwistdInForeground(self) -> None:
        """ExecStart runs twistd in the foreground, with no pid file, as the measuring plugin."""
        [exec_start] = [line for line in self.text.splitlines() if line.startswith("ExecStart=")]
        self.assertIn("twistd --nodaemon --pidfile= measuring ", exec_start)
        for setting in ("Type=simple", "Restart=on-failure", "StateDirectory=measuring"):
            self.assertIn(setting, self.text.splitlines())
