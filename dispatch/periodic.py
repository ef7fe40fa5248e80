"""One background loop a component: ``_run`` as one task, started once, cancelled on stop
(the leadership renewer, the housekeepers, the calibrator)."""

from __future__ import annotations

import asyncio
import contextlib


class Periodic:
    """A component whose ``_run`` loop is one task: started once, cancelled on stop."""

    task_name = "periodic"
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
