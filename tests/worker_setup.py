"""Run in every worker process of the suite's local Ray (its
``worker_process_setup_hook``), before any task.

Only for diagnosis: a test that times out (a hang) sends SIGUSR2 to the
session's worker processes, which then write every thread's stack to their
stderr (Ray keeps it in ``logs/worker-*.err``); conftest adds those stacks to
the failure's report. Nothing else in a worker changes.
"""

from __future__ import annotations

import faulthandler
import signal


def dump_stacks_on_sigusr2() -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
