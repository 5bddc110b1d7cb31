"""How an exception becomes the one line a user reads."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-empty line of `err`'s message, or its type name when the message is empty.

    Library errors (torch, DALI, OmegaConf) often carry a multi-line message whose first line
    says what went wrong and whose rest is a stack or a hint for the library's developers.
    """
    for line in str(err).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
