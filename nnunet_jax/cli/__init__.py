"""The command lines: each module holds one script's flags and ``main``; ``run()`` is its console entry.

The top-level scripts of a checkout (``train.py``, ``python -m preprocess``, ...) and the installed console
commands (``nnunet-train``, ``nnunet-preprocess``, ...) both call ``run()``; flags are defined only then, so
importing a module of the library never defines absl flags that could clash with a user's own.
:func:`run_app` is the one place for what every command does alike: help, log levels, usage and OS errors.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from nnunet_jax.quiet import quiet_libraries


class _HelpExitsZero:
    """Mixed into absl's help flags, which exit 1 like a usage error: help that was asked for is a success."""

    def parse(self, argument: str) -> None:
        try:
            super().parse(argument)  # type: ignore[misc]
        except SystemExit as e:
            raise SystemExit(0 if e.code == 1 else e.code) from None
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None


class _Help(_HelpExitsZero, app.HelpFlag):
    SHORT_NAME = "h"  # -h, as most command lines have; absl's -? moves to --helpshort


class _HelpShort(_HelpExitsZero, app.HelpshortFlag):
    SHORT_NAME = "?"


class _HelpFull(_HelpExitsZero, app.HelpfullFlag):
    pass


class _HelpXML(_HelpExitsZero, app.HelpXMLFlag):
    pass


def _define_help_flags() -> None:
    """absl's help flags (app.run would define them), then ours in their place."""
    app.define_help_flags()
    for cls in (_Help, _HelpShort, _HelpFull, _HelpXML):
        flag = cls()
        flag.allow_override = True
        flags.DEFINE_flag(flag, module_name="absl.app")


def describe_os_error(e: OSError) -> str:
    """``reason: path`` (``reason: path -> path2``) for a one-line error message."""
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif e.strerror:
        reason = e.strerror[:1].lower() + e.strerror[1:]
    elif e.errno:
        reason = os.strerror(e.errno).lower()
    else:
        return str(e) or type(e).__name__  # e.g. FileNotFoundError("no checkpoint at ...")
    paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


def _wrap(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """``main`` with the checks and settings every command shares (run once the flags are parsed)."""

    def wrapped(argv: list[str]) -> int | None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        verbose = flags.FLAGS["verbosity"].present  # --verbosity / -v given: the user wants the logs
        quiet_libraries(verbose)
        if not verbose:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO/WARNING (before it starts)
            absl_logging.set_verbosity(absl_logging.WARNING)  # app.run sets INFO; ours stay at WARNING
        try:
            return main(argv)
        except OSError as e:  # a full disk, a read-only folder, a missing input: one line, no traceback
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            return 2

    return wrapped


def run_app(main: Callable[[list[str]], int | None], define_flags: Callable[[], None], module: str) -> None:
    """Define ``module``'s flags, make them the ones ``--help`` lists, and run ``main`` under absl."""
    define_flags()
    _define_help_flags()
    fv = flags.FLAGS
    if os.path.basename(sys.argv[0]) == "__main__.py":  # python -m preprocess: help says that, not a path
        sys.argv[0] = f"python -m {os.path.basename(os.path.dirname(sys.argv[0]))}"
    for flag in fv.get_flags_for_module(module):  # --help shows the key flags of sys.argv[0]
        fv.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module is not sys.modules[module]:
        main_module.__doc__ = sys.modules[module].__doc__
    app.run(_wrap(main))
