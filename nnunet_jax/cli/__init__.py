"""The command lines: each module holds one script's flags and ``main``; ``run()`` is its console entry.

The top-level scripts of a checkout (``train.py``, ``python -m preprocess``, ...) and the installed console
commands (``nnunet-train``, ``nnunet-preprocess``, ...) both call ``run()``; flags are defined only then, so
importing a module of the library never defines absl flags that could clash with a user's own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags


def run_app(main: Callable[[list[str]], int | None], define_flags: Callable[[], None], module: str) -> None:
    """Define ``module``'s flags, make them the ones ``--help`` lists, and run ``main`` under absl."""
    define_flags()
    fv = flags.FLAGS
    for flag in fv.get_flags_for_module(module):  # --help shows the key flags of sys.argv[0]
        fv.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module is not sys.modules[module]:
        main_module.__doc__ = sys.modules[module].__doc__
    app.run(main)
