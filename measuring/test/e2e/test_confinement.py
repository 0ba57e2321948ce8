"""
Tests for what holds a job to its folder and its limits: ``output.write_results`` past
``--max-result-bytes``, ``results.place_results`` moving a sandboxed worker's results out of its
outbox, ``worker.limit_job`` (in a child process, so that this one keeps its limits), and the
``bwrap`` command line of ``sandbox.Bubblewrap``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from measuring.errors import Forbidden
from measuring.server import paths, results
from measuring.server.pool.sandbox import Bubblewrap
from measuring.test.support import environment, write_dataset, write_formulas
from measuring.test.unit.test_loader import make_folder, result_frames
from measuring.worker import output

JOB = "20261128-100000-abcdef"


def tree(folder: str) -> dict[str, str]:
    """Every file below ``folder`` (relative path: content); symlinks as ``-> target``."""
    found = {}
    for parent, folders, names in os.walk(folder):
        for name in folders + names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[relative] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path) as f:
                    found[relative] = f.read()
    return found


class WriteResultsLimitTests(SynchronousTestCase):
    """``write_results`` with ``max_bytes``: all of it, or nothing."""

    def setUp(self) -> None:
        self.directory = make_folder(self, "lab")
        self.results = os.path.join(self.directory, "results")
        self.frames = result_frames()
        written = output.write_results(self.directory, "measure", self.frames, "csv")
        self.size = sum(os.path.getsize(os.path.join(self.directory, f)) for f in written.values())

    def test_overLimitLeavesNothing(self) -> None:
        """One byte too many is ResultsTooLarge naming the limit, and no folder is left."""
        error = self.assertRaises(
            output.ResultsTooLarge,
            output.write_results,
            self.directory,
            JOB,
            self.frames,
            "csv",
            self.size - 1,
        )
        self.assertIn(f"more than the {self.size - 1} a job may write", str(error))
        self.assertIn("--max-result-bytes", str(error))
        self.assertEqual(os.listdir(self.results), ["measure"])

    def test_atLimitWritten(self) -> None:
        """Results of exactly ``max_bytes`` are written."""
        files = output.write_results(self.directory, JOB, self.frames, "csv", self.size)
        self.assertEqual(sorted(files), sorted(self.frames))
        self.assertEqual(sorted(os.listdir(self.results)), sorted(["measure", JOB]))


class PlaceResultsTests(SynchronousTestCase):
    """``place_results`` moves ``outbox/results/<job>`` to ``Directory/results/<job>``."""

    def setUp(self) -> None:
        self.outbox = make_folder(self, "outbox")
        self.directory = make_folder(self, "lab")
        self.secret = make_folder(self, "secret")
        with open(os.path.join(self.secret, "tokens"), "w") as f:
            f.write("the-server-token-0123456789\n")

    def fill(self, outbox: str | None = None, **files: str) -> str:
        """Write ``files`` (name: content) as a worker's results; returns their folder."""
        folder = os.path.join(outbox or self.outbox, "results", JOB)
        os.makedirs(folder)
        for name, content in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(content)
        return folder

    def assertRefused(self, *words: str) -> None:
        """Placing is Forbidden with ``words``; Directory and the secret folder are unchanged."""
        before = tree(self.directory)
        error = self.assertRaises(
            Forbidden, results.place_results, self.outbox, self.directory, JOB
        )
        for word in words:
            self.assertIn(word, error.message)
        self.assertEqual(tree(self.directory), before)
        self.assertEqual(tree(self.secret), {"tokens": "the-server-token-0123456789\n"})

    def test_moved(self) -> None:
        """The results appear in Directory/results/<job>, whole."""
        self.fill(**{"peak.csv": "peak\n41.5\n", "hourly.csv": "time,value\n"})
        results.place_results(self.outbox, self.directory, JOB)
        self.assertEqual(
            tree(self.directory),
            {
                f"results/{JOB}/peak.csv": "peak\n41.5\n",
                f"results/{JOB}/hourly.csv": "time,value\n",
            },
        )

    def test_folderOfParts(self) -> None:
        """A table written as a folder of Parquet parts is placed whole, parts in order."""
        folder = self.fill(**{"peak.csv": "peak\n41.5\n"})
        os.mkdir(os.path.join(folder, "kept.parquet"))
        for number in range(3):
            with open(os.path.join(folder, "kept.parquet", f"part.{number:05d}.parquet"), "w") as f:
                f.write(f"part {number}")
        results.place_results(self.outbox, self.directory, JOB)
        self.assertEqual(
            tree(self.directory),
            {
                f"results/{JOB}/peak.csv": "peak\n41.5\n",
                **{
                    f"results/{JOB}/kept.parquet/part.{n:05d}.parquet": f"part {n}"
                    for n in range(3)
                },
            },
        )

    def test_linkAmongPartsRefused(self) -> None:
        """A symlink inside a folder of parts is Forbidden too; nothing moves."""
        folder = self.fill(**{"peak.csv": "peak\n1\n"})
        os.mkdir(os.path.join(folder, "kept.parquet"))
        target = os.path.join(self.secret, "tokens")
        os.symlink(target, os.path.join(folder, "kept.parquet", "part.00000.parquet"))
        self.assertRefused("kept.parquet/part.00000.parquet", "not a plain file")

    def test_madeInPlace(self) -> None:
        """Placed results get the results folder's group (setgid), as files written there do."""
        folder = os.path.join(self.directory, "results")
        os.makedirs(folder)
        group = 100 if os.getgid() != 100 else 101
        try:
            os.chown(folder, -1, group)
        except PermissionError:
            raise SkipTest("changing a folder's group needs root here") from None
        os.chmod(folder, 0o2775)
        self.fill(**{"peak.csv": "peak\n41.5\n"})
        results.place_results(self.outbox, self.directory, JOB)
        placed = os.path.join(folder, JOB, "peak.csv")
        self.assertEqual(os.stat(placed).st_gid, group)

    def test_replacesEarlierRun(self) -> None:
        """A job run again replaces its earlier results entirely."""
        os.makedirs(os.path.join(self.directory, "results", JOB))
        with open(os.path.join(self.directory, "results", JOB, "old.csv"), "w") as f:
            f.write("old\n")
        self.fill(**{"new.csv": "new\n"})
        results.place_results(self.outbox, self.directory, JOB)
        self.assertEqual(tree(self.directory), {f"results/{JOB}/new.csv": "new\n"})

    def test_nothingToPlace(self) -> None:
        """A job that wrote no table leaves Directory as it was."""
        results.place_results(self.outbox, self.directory, JOB)
        self.assertEqual(os.listdir(self.directory), [])

    def test_acrossFileSystems(self) -> None:
        """From an outbox on another file system the results are copied, complete."""
        if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
            raise self.skipTest("no writable /dev/shm")
        if os.stat("/dev/shm").st_dev == os.stat(self.directory).st_dev:
            raise self.skipTest("/dev/shm is on the same file system as the test's folder")
        outbox = tempfile.mkdtemp(prefix="measuring-test-", dir="/dev/shm")
        self.addCleanup(shutil.rmtree, outbox)
        self.fill(outbox, **{"peak.csv": "peak\n41.5\n"})
        results.place_results(outbox, self.directory, JOB)
        self.assertEqual(tree(self.directory), {f"results/{JOB}/peak.csv": "peak\n41.5\n"})

    def test_symlinkAmongResultsRefused(self) -> None:
        """A symlink among the results (to the token file, say) is Forbidden; nothing moves."""
        folder = self.fill(**{"peak.csv": "peak\n1\n"})
        os.symlink(os.path.join(self.secret, "tokens"), os.path.join(folder, "stolen.csv"))
        self.assertRefused("stolen.csv", "not a plain file")

    def test_otherKindsRefused(self) -> None:
        """A folder or a named pipe among the results is Forbidden too."""
        for make in (os.mkdir, os.mkfifo):
            folder = self.fill(**{"peak.csv": "peak\n1\n"})
            make(os.path.join(folder, "odd"))
            self.assertRefused("odd", "not a plain file")
            shutil.rmtree(os.path.join(self.outbox, "results"))

    def test_resultsFolderLeadingOutRefused(self) -> None:
        """``results/<job>``, or ``results``, a symlink out of the outbox, is Forbidden."""
        os.makedirs(os.path.join(self.outbox, "results"))
        os.symlink(self.secret, os.path.join(self.outbox, "results", JOB))
        self.assertRefused("leads outside the worker's outbox")
        os.remove(os.path.join(self.outbox, "results", JOB))
        os.rmdir(os.path.join(self.outbox, "results"))
        os.makedirs(os.path.join(self.secret, JOB))
        os.symlink(self.secret, os.path.join(self.outbox, "results"))
        self.assertRefused("leads outside the worker's outbox")
        self.assertEqual(os.listdir(os.path.join(self.secret, JOB)), [])

    def test_earlierRunKeptWhenRefused(self) -> None:
        """A refused placing leaves the earlier run's results as they were."""
        os.makedirs(os.path.join(self.directory, "results", JOB))
        with open(os.path.join(self.directory, "results", JOB, "old.csv"), "w") as f:
            f.write("old\n")
        folder = self.fill(**{"new.csv": "new\n"})
        os.symlink("/etc/passwd", os.path.join(folder, "passwd.csv"))
        self.assertRefused("passwd.csv")
        self.assertEqual(tree(self.directory), {f"results/{JOB}/old.csv": "old\n"})


class ResultsIntoStateDirTests(SynchronousTestCase):
    """A ``results`` folder must not lead into the server's state directory."""

    def test_resultsLinkedIntoStateDirRefused(self) -> None:
        """Directory's ``results`` linked to the state directory (inside it) is Forbidden."""
        root = make_folder(self, "root")
        state = os.path.join(root, ".measuring")
        os.makedirs(state)
        write_dataset(root)
        write_formulas(root)
        os.symlink(".measuring", os.path.join(root, "results"))
        error = self.assertRaises(
            Forbidden,
            paths.resolve_job,
            (root,),
            ".",
            "time_series.parquet",
            "work.py",
            (state,),
        )
        self.assertIn("results", error.message)


def run_python(script: str, *arguments: str) -> str:
    """What ``script`` prints, run by this Python in a child process that must exit with 0."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *arguments],
        capture_output=True,
        text=True,
        env=environment(),
    )
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {done.stderr}")
    return done.stdout


class LimitJobTests(SynchronousTestCase):
    """``worker.limit_job`` bounds the files and processes of the job's worker."""

    def test_fileSizeLimit(self) -> None:
        """Past ResultBytes a write fails with EFBIG; the worker is not killed by SIGXFSZ."""
        path = os.path.abspath(self.mktemp())
        output = run_python(
            """
            import errno, os, resource, sys
            from measuring.worker.job import limit_job
            limit_job({"ResultBytes": 4096}, sandboxed=False)
            print(*resource.getrlimit(resource.RLIMIT_FSIZE))
            fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
            print(os.write(fd, b"x" * 3000), os.write(fd, b"x" * 3000))
            try:
                os.write(fd, b"x")
            except OSError as e:
                print(errno.errorcode[e.errno])
            """,
            path,
        )
        self.assertEqual(output.splitlines(), ["4096 4096", "3000 1096", "EFBIG"])
        self.assertEqual(os.path.getsize(path), 4096)

    def test_processLimit(self) -> None:
        """Processes bounds RLIMIT_NPROC outside the sandbox only; no limits change nothing."""
        output = run_python(
            """
            import resource
            from measuring.worker.job import limit_job
            before = resource.getrlimit(resource.RLIMIT_NPROC)
            limit_job({}, sandboxed=False)
            limit_job({"Processes": 5}, sandboxed=True)
            print(resource.getrlimit(resource.RLIMIT_NPROC) == before)
            print(resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY)
            limit_job({"Processes": 5}, sandboxed=False)
            soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
            print(soft == hard, 5 < soft < 1_000_000)
            """
        )
        self.assertEqual(output.split(), ["True", "True", "True", "True"])


class BubblewrapTests(SynchronousTestCase):
    """``Bubblewrap.command``: what a sandboxed worker may see and write."""

    def setUp(self) -> None:
        self.root, self.other = make_folder(self, "root"), make_folder(self, "other")
        self.state = os.path.join(self.root, ".measuring")
        self.outbox = os.path.join(self.state, "tmp", "worker-1")
        os.makedirs(self.outbox)
        self.token_file = os.path.join(make_folder(self, "etc"), "tokens")
        with open(self.token_file, "w") as f:
            f.write("the-server-token-0123456789\n")
        self.argv = [sys.executable, "-P", "-m", "measuring.worker", "0"]
        sandbox = Bubblewrap(
            (self.root, self.other), (self.state, self.token_file, "/nonexistent"), "/opt/bwrap"
        )
        self.command = sandbox.command(self.argv, self.outbox)
        self.options = self.command[: -len(self.argv) - 1]

    def mounts(self, option: str) -> list[tuple[str, ...]]:
        """Each ``option`` with its arguments, in order (two for binds, one for tmpfs)."""
        width = 1 if option in ("--tmpfs", "--chdir") else 2
        return [
            tuple(self.options[i + 1 : i + 1 + width])
            for i, word in enumerate(self.options)
            if word == option
        ]

    def position(self, *words: str) -> int:
        """Where the option ``words`` (an option and its arguments) starts in the command."""
        for i in range(len(self.options)):
            if tuple(self.options[i : i + len(words)]) == words:
                return i
        raise AssertionError(f"{words} not in {self.options}")

    def test_runsTheWorkerAfterDashDash(self) -> None:
        """The command is bwrap's options, then ``--``, then the worker's own command line."""
        self.assertEqual(self.command[0], "/opt/bwrap")
        self.assertEqual(self.command[-len(self.argv) - 1 :], ["--", *self.argv])
        self.assertNotIn("--", self.options)

    def test_unshares(self) -> None:
        """The worker gets its own PID namespace and no network, and dies with the server."""
        for option in ("--unshare-pid", "--unshare-net", "--die-with-parent", "--new-session"):
            self.assertIn(option, self.options)

    def test_dataRootsReadOnly(self) -> None:
        """The data roots are bound read-only; the only writable bind is the outbox."""
        for root in (self.root, self.other):
            self.assertIn((root, root), self.mounts("--ro-bind"))
        self.assertEqual(self.mounts("--bind"), [(self.outbox, self.outbox)])
        self.assertEqual(self.mounts("--chdir"), [(self.outbox,)])
        self.assertNotIn("--dev-bind", self.options)

    def test_hidden(self) -> None:
        """The state directory is an empty tmpfs and the token file /dev/null, over the roots."""
        self.assertIn((self.state,), self.mounts("--tmpfs"))
        self.assertIn(("/dev/null", self.token_file), self.mounts("--ro-bind"))
        self.assertNotIn("/nonexistent", self.options)
        hide = self.position("--tmpfs", self.state)
        self.assertGreater(hide, self.position("--ro-bind", self.root, self.root))
        self.assertGreater(self.position("--bind", self.outbox, self.outbox), hide)

    def test_pythonReadOnly(self) -> None:
        """This Python and its packages are bound read-only."""
        prefix = os.path.realpath(sys.prefix)
        self.assertIn((prefix, prefix), self.mounts("--ro-bind"))
