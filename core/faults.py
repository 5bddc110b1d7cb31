"""Fault injection for the tests of crash behaviour; inert unless a test sets its variable.

The variables are read once per process (workers inherit them from the test's environment), so
the hot paths that consult them pay one `is None` check:
  - ``HCSC_TEST_DIE_AT=rank:step``: that rank exits abruptly (``os._exit(17)``, no cleanup, as a
    SIGKILL would) right after that training step. Tests of the dead-rank behaviour (the job must
    exit non-zero, never hang) and of resume after a hard kill.
  - ``HCSC_TEST_SIGTERM_IN_CLUSTERING=rank:epoch``: that rank sends itself SIGTERM as the clustering
    of that epoch starts (what a launcher forwarding a job's SIGTERM does at an unlucky moment), to
    test that the clustering phase honours a stop.
  - ``HCSC_SHARDS_TEST_STALL_AFTER=K``: the shard writer stops for an hour half-way through every
    shard numbered K or above, with a half-written temporary tar on disk, so a test can kill the
    build there and check that a rerun resumes cleanly.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable

DIE_AT_ENV = "HCSC_TEST_DIE_AT"
STALL_ENV = "HCSC_SHARDS_TEST_STALL_AFTER"
SIGTERM_ENV = "HCSC_TEST_SIGTERM_IN_CLUSTERING"
_DIE_EXIT_CODE = 17
_STALL_SECONDS = 3600


@functools.cache
def step_hook(rank: int) -> Callable[[int], None] | None:
    """A function to call after every training step on `rank`, or None when no fault is set."""
    target = os.environ.get(DIE_AT_ENV, "")
    want_rank, _, want_step = target.partition(":")
    if not target or int(want_rank) != rank:
        return None

    def die_after(step: int) -> None:
        if step == int(want_step):
            os._exit(_DIE_EXIT_CODE)

    return die_after


def clustering_starts(rank: int, epoch: int) -> None:
    """Called as the clustering of `epoch` starts on `rank`: SIGTERM to itself when a test asks."""
    want_rank, _, want_epoch = os.environ.get(SIGTERM_ENV, "").partition(":")
    if want_rank and int(want_rank) == rank and int(want_epoch) == epoch:
        os.kill(os.getpid(), signal.SIGTERM)


def shard_stall_sample(shard_number: int, num_samples: int) -> int:
    """The sample of shard `shard_number` before which the writer stalls, or -1 (no fault)."""
    after = os.environ.get(STALL_ENV)
    return num_samples // 2 if after and shard_number >= int(after) else -1


def stall() -> None:
    """Block this process (the test kills it)."""
    time.sleep(_STALL_SECONDS)
