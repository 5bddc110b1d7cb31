"""What pip installed that the project cannot check through its own imports: the faiss build.

faiss-cpu and faiss-gpu both install the module `faiss`; installed together, the second one's files
overwrite the first's, and uninstalling either breaks the other. pyproject.toml therefore makes
each an extra (`cpu`, `gpu`) and not a base dependency; the CLIs call `check_faiss_build` before
importing anything that imports faiss, so a missing or doubled build is one line, not a traceback.
"""

from __future__ import annotations

from importlib import metadata

from core.cli import UserError

FAISS_BUILDS = ("faiss-cpu", "faiss-gpu")


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_faiss_build() -> str:
    """The one installed faiss build's name.

    Raises:
        UserError: none or both installed; the message says how to repair the environment.
    """
    found = [name for name in FAISS_BUILDS if installed(name)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError("faiss is not installed; install exactly one build: pip install -e '.[cpu]' "
                        "(or '.[gpu]' on a CUDA 12+ host; README.md#gpu)")
    raise UserError("faiss-cpu and faiss-gpu are both installed and overwrite each other's files; "
                    "repair with: pip uninstall -y faiss-cpu faiss-gpu && pip install -e '.[gpu]' "
                    "(or '.[cpu]')")
