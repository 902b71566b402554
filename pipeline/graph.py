"""The declared stage graph: nodes name their upstream nodes; the engine resolves, runs and reports.

A :class:`Node` has a name, the names of the nodes it reads (``deps``), a ``run`` that turns
their outputs into its own, and a ``key`` that turns their keys into its cache key without
running anything.  :class:`Graph` runs a node's upstream nodes first, each at most once per
graph (one command builds one graph, so a node that two consumers read runs once), times
every node, and answers "which cache entries does this graph reach" (:meth:`Graph.live`)
without writing.

The graph is generic: it knows no stage, no model and no store layout.  The application
layer (``camim/graph.py``) declares the concrete nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PipelineError


@dataclass
class Node:
    name: str
    run: Callable[[dict[str, Any]], Any]
    deps: tuple[str, ...] = ()
    #: upstream keys -> this node's cache key (``None``: the node writes nothing to the store)
    key: Callable[[dict[str, str | None]], str | None] | None = None
    #: the store stage its key lives under (default: the node's name)
    stage: str | None = None


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, run: Callable[[dict[str, Any]], Any], deps: tuple[str, ...] | list[str] = (),
            key: Callable[[dict[str, str | None]], str | None] | None = None, stage: str | None = None) -> Node:
        if name in self.nodes:
            raise PipelineError(f"graph: node {name!r} declared twice")
        node = Node(name, run, tuple(deps), key, stage)
        self.nodes[name] = node
        return node

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def order(self, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
        """The nodes ``targets`` need (default: all), upstream first; a circle is an error naming it."""
        out: list[str] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(name: str, path: tuple[str, ...]):
            if name not in self.nodes:
                where = f" (read by {path[-1]!r})" if path else ""
                raise PipelineError(f"graph: no node {name!r}{where}; declared: {', '.join(self.nodes)}")
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                circle = " -> ".join((*path[path.index(name):], name))
                raise PipelineError(f"graph: nodes read each other in a circle: {circle}")
            state[name] = 1
            for dep in self.nodes[name].deps:
                visit(dep, (*path, name))
            state[name] = 2
            out.append(name)

        for t in targets if targets is not None else list(self.nodes):
            visit(t, ())
        return out

    def resolve(self, name: str) -> Any:
        """The output of ``name``, running it (and what it reads) first if this graph has not."""
        for n in self.order([name]):
            if n in self.outputs:
                continue
            node = self.nodes[n]
            t0 = time.perf_counter()
            self.outputs[n] = node.run({d: self.outputs[d] for d in node.deps})
            self.seconds[n] = time.perf_counter() - t0
        return self.outputs[name]

    def key(self, name: str) -> str | None:
        """The cache key of ``name`` from its upstream keys; nothing runs and nothing is written."""
        for n in self.order([name]):
            if n not in self.keys:
                node = self.nodes[n]
                self.keys[n] = node.key({d: self.keys[d] for d in node.deps}) if node.key else None
        return self.keys[name]

    def live(self, targets: list[str] | None = None) -> set[tuple[str, str]]:
        """``(stage, key)`` of every node ``targets`` reach that has a key."""
        out = set()
        for n in self.order(targets):
            k = self.key(n)
            if k is not None:
                out.add((self.nodes[n].stage or n, k))
        return out

    def timings(self) -> list[tuple[str, float]]:
        """``(node, seconds)`` of every node this graph ran, in the order they ran."""
        return list(self.seconds.items())
