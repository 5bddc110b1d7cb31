"""How an exception becomes the one line a user reads."""

from __future__ import annotations

from collections.abc import Callable


def first_line(err: BaseException) -> str:
    """The first non-empty line of `err`'s message, or its type name when the message is empty.

    Library errors (torch, DALI, OmegaConf) often carry a multi-line message whose first line
    says what went wrong and whose rest is a stack or a hint for the library's developers.
    """
    for line in str(err).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


class StopRequested(Exception):
    """A stop signal reached some rank during long collective work (the clustering phase); every
    rank raises it at the same agreed point, so the caller can save and exit on all ranks alike."""


StopCheck = Callable[[], bool]  # a collective: True on every rank when any rank was signalled


def stop_if_requested(should_stop: StopCheck | None, where: str) -> None:
    """Raise `StopRequested` on every rank when `should_stop` (called on every rank) says so."""
    if should_stop is not None and should_stop():
        raise StopRequested(f"stop requested during {where}")
