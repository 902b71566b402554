"""The stage contract and the backend registry.

A stage is a small class with a ``name``, a ``version``, a config whose
``key_config()`` yields its cache key, and ``run(batch) -> list[ItemResult]``.
Whatever changes the output goes into ``key_config()`` (model id and revision,
rendered prompt, generation and preprocessing settings); whatever does not (batch
size, device, worker count, paths) stays out.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .errors import PipelineError
from .hashing import key_of


class Stage:
    name: str = "stage"
    version: str = "1"
    #: names of tensors whose first dimension varies per item
    ragged: tuple[str, ...] = ()

    def key_config(self) -> dict:
        """Everything that changes this stage's output. Override."""
        raise NotImplementedError

    def label(self) -> str:
        """A short human description for ``cache ls``."""
        return ""

    @property
    def key(self) -> str:
        return key_of({"stage": self.name, "version": self.version, "config": self.key_config()})

    def spec(self) -> dict:
        return {"stage": self.name, "version": self.version, "key_config": self.key_config(), "label": self.label()}

    def setup(self) -> None:
        """Load models once; called only when there is work to do."""

    def run(self, batch: list[dict]) -> list:
        raise NotImplementedError

    def teardown(self) -> None:
        """Free models."""

    def for_workers(self, engine: str) -> None:
        """Called once by an executor that runs copies of this stage in other processes (``engine``,
        e.g. ``ray``), before it ships them: swap process-local shared state, such as a rate limiter,
        for handles that every copy shares."""


class Registry:
    """Short names → backend factories, resolved lazily from ``module:attr`` paths.

    ``MLLM=imported:qwen`` looks up ``imported`` and passes ``qwen`` as the argument.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str | Callable] = {}

    def add(self, name: str, target: str | Callable) -> None:
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise PipelineError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            mod, _, attr = target.partition(":")
            target = getattr(importlib.import_module(mod), attr)
            self._entries[name] = target
        return target

    def split(self, spec: str) -> tuple[str, str]:
        """``"imported:qwen"`` → ``("imported", "qwen")``; ``"blip2"`` → ``("blip2", "")``."""
        name, _, arg = spec.partition(":")
        return name, arg

    def create(self, spec: str, **kwargs: Any):
        name, arg = self.split(spec)
        return self.get(name)(arg, **kwargs)
