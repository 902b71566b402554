"""The engine: config, cache keys and store, shard IO, runner, progress, CLI.

Nothing in this package imports model code; stages live in ``stages/``.
"""

__version__ = "0.1.0"
