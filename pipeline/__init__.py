"""The engine: settings, the declared graph, cache keys and store, shard IO, executors, progress.

Nothing in this package imports model code; stages live in ``stages/``.
"""

__version__ = "0.1.0"
