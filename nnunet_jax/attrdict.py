"""A plain dict with attribute access: lets code that reads ``config.x`` / ``config.get`` (the training
helpers) take a config without importing ml_collections (benchmark.py must run on a bare GPU machine)."""

from __future__ import annotations

from typing import Any


class AttrDict(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e
