"""
The fakes of ``support.fakes`` are held to the interfaces of the parts they stand for, as the
real parts are: every method the interface names exists with the same parameters, and every
attribute it declares is set. A fake that drifts from the real part fails here, not in a test
that then proves nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from measuring.messages import Message
from measuring.server import dispatch, threads
from measuring.server.info import InfoService
from measuring.server.jobs import scheduler
from measuring.server.pool.pool import WorkerPool
from measuring.server.pool.process import RunningJob
from measuring.server.threads import ThreadRunner
from measuring.test.support import fakes

JOB: Message = {"Job": "20270115-080000-abcdef"}


def _interface(protocol: type) -> tuple[dict[str, inspect.Signature], set[str]]:
    """The methods (with their signatures) and the attributes a typing Protocol declares."""
    methods = {
        name: inspect.signature(value)
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    }
    return methods, set(vars(protocol).get("__annotations__", {}))


def _parameters(signature: inspect.Signature) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in signature.parameters.values() if p.name != "self"]


class ContractTests(SynchronousTestCase):
    """Fake and real parts provide the same interface."""

    def assertProvides(self, implementation: type, protocol: type, instance: Any = None):
        methods, attributes = _interface(protocol)
        self.assertTrue(methods or attributes, protocol)
        for name, signature in methods.items():
            own = getattr(implementation, name, None)
            assert callable(own), f"{implementation.__name__} has no {name}()"
            self.assertEqual(
                _parameters(inspect.signature(own)),
                _parameters(signature),
                f"{implementation.__name__}.{name}",
            )
        for name in attributes:
            where = instance if instance is not None else implementation
            self.assertTrue(hasattr(where, name), f"{implementation.__name__} has no {name}")

    def test_runningJob(self) -> None:
        """The fake running job is what the scheduler expects of the pool's running job."""
        self.assertProvides(
            fakes.FakeRunningJob, scheduler.RunningJob, fakes.FakeRunningJob(JOB, True)
        )
        self.assertProvides(RunningJob, scheduler.RunningJob, RunningJob(JOB))

    def test_pool(self) -> None:
        """FakePool and WorkerPool give the scheduler the same run()."""
        self.assertProvides(fakes.FakePool, scheduler.Pool)
        self.assertProvides(WorkerPool, scheduler.Pool)

    def test_runners(self) -> None:
        """The held and recording runners run blocking calls as ThreadRunner does."""
        for runner in (fakes.HeldRunner, fakes.RecordingRunner, threads.Synchronous, ThreadRunner):
            self.assertProvides(runner, threads.Runner)

    def test_info(self) -> None:
        """FakeInfo answers Info requests as InfoService does."""
        self.assertProvides(fakes.FakeInfo, dispatch.Info)
        self.assertProvides(InfoService, dispatch.Info)
