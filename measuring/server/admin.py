"""
``measuring-admin``: what an operator does to a server's state directory while no server runs.

``measuring-admin recover STATE_DIR`` rebuilds a damaged job database (``jobs.salvage``): every
job that can still be read goes into a fresh ``jobs.sqlite``; the damaged files are kept beside
it. ``measuring-admin check STATE_DIR`` says whether the database is damaged. The state
directory's lock keeps both from running beside a server. Exit codes: 0 done (or nothing to do),
1 it could not be done, 2 the command is wrong. Blocking; never imports the reactor.
"""

from __future__ import annotations

import argparse
import os
import sys

from measuring.server.jobs.salvage import DATABASE, damage, recover
from measuring.server.jobs.store import StateLocked, lock_state_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="measuring-admin",
        description="Look after a measuring server's state directory while the server is stopped.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (
        ("check", "say whether the job database is damaged (PRAGMA quick_check)"),
        ("recover", "copy every readable job into a fresh job database, keeping the damaged one"),
    ):
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument("state_dir", metavar="STATE_DIR", help="the server's --state-dir")
    commands.choices["recover"].add_argument(
        "--force", action="store_true", help="rebuild the database even if it is not damaged"
    )
    return parser


def _owner(state_dir: str, paths: list[str]) -> None:
    """Run as root, give what was made the state directory's owner (the service user)."""
    if os.geteuid() != 0:
        return
    folder = os.stat(state_dir)
    for path in paths:
        if os.path.exists(path):
            os.chown(path, folder.st_uid, folder.st_gid)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    arguments = _parser().parse_args(argv)
    state_dir = os.path.realpath(arguments.state_dir)
    path = os.path.join(state_dir, DATABASE)
    if not os.path.isfile(path):
        print(f"measuring-admin: there is no job database {path}", file=sys.stderr)
        return 1
    try:
        lock = lock_state_dir(state_dir)
    except StateLocked as e:
        print(f"measuring-admin: {e}; stop it first", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"measuring-admin: cannot lock {state_dir}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        problem = damage(path)
        if arguments.command == "check" or (problem is None and not arguments.force):
            print(f"{path}: " + (f"damaged ({problem})" if problem else "not damaged"))
            return 1 if problem and arguments.command == "check" else 0
        salvage = recover(state_dir)
        _owner(state_dir, [path])
        print(f"{path}: {salvage.summary()}")
        return 0
    except OSError as e:
        print(f"measuring-admin: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)


def run() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
