"""
The systemd units: they say what the server needs (notify, watchdog, restarts, a hardened view),
``systemd-analyze`` finds no problem in them nor in the drop-ins docs/deploy.md gives, and the
service's exposure stays at most 2.0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.local import PACKAGE_ROOT, twistd
from measuring.server.config import Config

UNIT = os.path.join(PACKAGE_ROOT, "tcp_server.service")
SOCKET = os.path.join(PACKAGE_ROOT, "tcp_server.socket")
DEPLOY = os.path.join(PACKAGE_ROOT, "docs", "deploy.md")
#: Where the units expect twistd; the tests put this machine's in its place.
INSTALLED_TWISTD = "/opt/measuring/bin/twistd"
MOST_EXPOSED = 2.0

_DROP_IN = re.compile(
    r"```ini\n# /etc/systemd/system/tcp_server\.service\.d/(?P<name>\S+\.conf)\n(?P<text>.*?)```",
    re.DOTALL,
)
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

Settings = dict[str, dict[str, list[str]]]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def settings(text: str) -> Settings:
    """Every value of every key, in order, by section, as systemd reads a unit file."""
    sections: Settings = {}
    section: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return sections


def drop_ins() -> list[tuple[str, str]]:
    """The drop-ins docs/deploy.md gives for tcp_server.service: (file name, text)."""
    return [(match["name"], match["text"]) for match in _DROP_IN.finditer(read(DEPLOY))]


def seconds(value: str) -> float:
    """A systemd time span such as ``60``, ``30s``, ``2min`` or ``1min 30s``, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    return sum(float(number) * units[unit] for number, unit in parts)


class UnitFileTests(SynchronousTestCase):
    """tcp_server.service and tcp_server.socket as shipped, read as systemd reads them."""

    def setUp(self) -> None:
        if not os.path.exists(UNIT):
            raise SkipTest(f"no tcp_server.service beside {PACKAGE_ROOT} (not a repository)")
        self.unit = settings(read(UNIT))
        self.service = self.unit["Service"]

    def test_startsTwistdInForeground(self) -> None:
        """ExecStart runs twistd in the foreground, with no pid file, as the measuring plugin."""
        [exec_start] = self.service["ExecStart"]
        self.assertTrue(
            exec_start.startswith(f"{INSTALLED_TWISTD} --nodaemon --pidfile= measuring ")
        )
        self.assertEqual(self.service["StateDirectory"], ["measuring"])

    def test_notifyAndWatchdog(self) -> None:
        """systemd waits for READY=1 from the server alone, and restarts it when pings stop."""
        self.assertEqual(self.service["Type"], ["notify"])
        self.assertEqual(self.service["NotifyAccess"], ["main"])
        [watchdog] = self.service["WatchdogSec"]
        self.assertTrue(0 < seconds(watchdog) <= 60, watchdog)
        self.assertEqual(self.service["Restart"], ["on-failure"])

    def test_restartsAreBounded(self) -> None:
        """A server that keeps failing to start is given up after a burst of restarts."""
        self.assertIn("StartLimitIntervalSec", self.unit["Unit"])
        self.assertIn("StartLimitBurst", self.unit["Unit"])

    def test_stopLeavesTheGrace(self) -> None:
        """Stopping outlasts the stop grace; a worker killed for memory fails its job only."""
        [timeout] = self.service["TimeoutStopSec"]
        grace = Config.__dataclass_fields__["stop_grace"].default
        assert isinstance(grace, float)
        self.assertGreater(seconds(timeout), grace)
        self.assertEqual(self.service["KillMode"], ["mixed"])
        self.assertEqual(self.service["OOMPolicy"], ["continue"])

    def test_hardened(self) -> None:
        """The service runs as its own user, with no capability, writing its data roots only."""
        expected = {
            "User": ["measuring"],
            "ProtectSystem": ["strict"],
            "ProtectHome": ["yes"],
            "PrivateTmp": ["yes"],
            "PrivateDevices": ["yes"],
            "NoNewPrivileges": ["yes"],
            "CapabilityBoundingSet": [""],
            "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
            "LimitNOFILE": ["65536"],
        }
        self.assertEqual({key: self.service.get(key) for key in expected}, expected)
        self.assertIn("@system-service", self.service.get("SystemCallFilter", []))
        for key in ("ReadWritePaths", "MemoryMax", "TasksMax"):
            self.assertIn(key, self.service)

    def test_socketOnLoopback(self) -> None:
        """The socket listens on loopback; with its drop-in the service takes it, not a port."""
        self.assertEqual(settings(read(SOCKET))["Socket"]["ListenStream"], ["127.0.0.1:8765"])
        [socket_drop_in] = [text for name, text in drop_ins() if name == "socket.conf"]
        exec_start = settings(socket_drop_in)["Service"]["ExecStart"]
        self.assertEqual(exec_start[0], "")
        self.assertIn(" --port systemd:domain=INET:index=0 ", exec_start[1])


class AnalyzeTests(SynchronousTestCase):
    """What ``systemd-analyze`` says of the units, copied beside this machine's twistd."""

    def setUp(self) -> None:
        if not os.path.exists(UNIT):
            raise SkipTest(f"no tcp_server.service beside {PACKAGE_ROOT} (not a repository)")
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (it comes with systemd)")
        self.analyze = analyze
        [command] = twistd()[:1]
        if os.path.basename(command) != "twistd":
            raise SkipTest("no twistd script beside this Python")
        self.twistd = command

    def units(self, *named_drop_ins: tuple[str, str]) -> str:
        """A folder with both units and the given drop-ins; returns the service's path."""
        folder = self.mktemp()
        os.makedirs(os.path.join(folder, "tcp_server.service.d"))
        for path in (UNIT, SOCKET):
            self.write(os.path.join(folder, os.path.basename(path)), read(path))
        for name, text in named_drop_ins:
            self.write(os.path.join(folder, "tcp_server.service.d", name), text)
        return os.path.join(folder, "tcp_server.service")

    def write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text.replace(INSTALLED_TWISTD, self.twistd))

    def run_analyze(self, *arguments: str) -> tuple[int, str]:
        result = subprocess.run(
            [self.analyze, *arguments], capture_output=True, text=True, timeout=120
        )
        return result.returncode, result.stdout + result.stderr

    def exposure(self, service: str) -> float:
        """The overall exposure level ``systemd-analyze security`` gives the unit file."""
        code, output = self.run_analyze("security", "--offline=true", service)
        if "--offline" in output and code != 0:
            raise SkipTest(f"this systemd-analyze has no --offline (systemd 250 has): {output}")
        match = _EXPOSURE.search(output)
        if match is None:
            self.fail(f"no exposure level in the output of systemd-analyze security:\n{output}")
        return float(match.group(1))

    def test_verify(self) -> None:
        """Both units verify clean once ExecStart points at a twistd that exists."""
        service = self.units()
        socket = os.path.join(os.path.dirname(service), "tcp_server.socket")
        self.assertEqual(self.run_analyze("verify", service, socket), (0, ""))

    def test_verifyDropIns(self) -> None:
        """Each drop-in docs/deploy.md gives verifies clean with the unit."""
        found = drop_ins()
        self.assertEqual(
            {name for name, _ in found},
            {"override.conf", "socket.conf", "sandbox.conf", "cluster.conf"},
        )
        for name, text in found:
            self.assertEqual(self.run_analyze("verify", self.units((name, text))), (0, ""), name)

    def test_exposure(self) -> None:
        """systemd-analyze security rates the service as shipped at most 2.0."""
        self.assertLessEqual(self.exposure(self.units()), MOST_EXPOSED)

    def test_socketActivationExposesLess(self) -> None:
        """Socket activation, as docs/deploy.md sets it up, closes more than the unit alone."""
        [socket_drop_in] = [(name, text) for name, text in drop_ins() if name == "socket.conf"]
        self.assertLess(self.exposure(self.units(socket_drop_in)), self.exposure(self.units()))
