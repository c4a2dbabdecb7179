"""Keep the libraries' log lines off the console unless asked for: our commands and the API print only ours.

Orbax logs every checkpoint restore through absl logging (about 30 INFO/WARNING lines per ``predict.py``
call; ``WARNING:absl:`` lines from the Python API), and JAX logs its platform probing ("Unable to initialize
backend 'tpu'", "An NVIDIA GPU may be present") through Python logging. None of it tells a user anything.
Only records below ERROR from those libraries are dropped: the project's own messages (``print``,
``warnings``, the ``nnunet_jax.*`` loggers) and the libraries' errors stay. A command line given
``--verbosity``/``-v`` calls :func:`quiet_libraries` with ``verbose=True``, which undoes all of it.
"""

from __future__ import annotations

import logging
import os
from importlib import util

from absl import logging as absl_logging  # first: absl's logger must exist (an ABSLLogger) before we attach

# Packages whose Python loggers are raised to ERROR and whose absl logging calls are filtered.
LIBRARIES = ("jax", "jaxlib", "orbax", "etils", "flax", "optax", "tensorstore", "ml_collections")


class _LibraryFilter(logging.Filter):
    """Drops records below ERROR logged through absl's logger from a file of one of ``LIBRARIES``.

    Orbax logs with ``absl.logging``: its records come from the logger named ``absl``, which a user's own
    absl logging shares, so they are told apart by the file that logged them, not by level.
    """

    def __init__(self) -> None:
        super().__init__()
        roots: list[str] = []
        for name in LIBRARIES:
            spec = util.find_spec(name)  # locates the package without importing it
            roots += [os.path.join(p, "") for p in (spec.submodule_search_locations or [])] if spec else []
        self.roots = tuple(roots)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.roots)


_filter: _LibraryFilter | None = None
_raised: dict[str, int] = {}  # logger name -> the level it had before we raised it


def quiet_libraries(verbose: bool = False) -> None:
    """Silence the libraries' INFO/WARNING records (``verbose=False``) or restore them (``verbose=True``).

    Idempotent. A library logger that the user (or ``--logger_levels``) already gave a level keeps it.
    """
    global _filter
    absl_logger = absl_logging.get_absl_logger()
    if verbose:
        if _filter is not None:
            absl_logger.removeFilter(_filter)
            _filter = None
        for name, level in _raised.items():
            logging.getLogger(name).setLevel(level)
        _raised.clear()
        return
    if _filter is None:
        _filter = _LibraryFilter()
        absl_logger.addFilter(_filter)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and name not in _raised:
            _raised[name] = logger.level
            logger.setLevel(logging.ERROR)
