"""The declared graph: upstream first, each node once, keys without running, circles named."""

import pytest

from pipeline.errors import PipelineError
from pipeline.graph import Graph


def _graph(calls: list):
    g = Graph()

    def node(name):
        def run(up):
            calls.append(name)
            return f"{name}({','.join(sorted(up.values()))})"
        return run

    g.add("data", node("data"), key=lambda up: "k-data")
    g.add("caps:a", node("caps:a"), ("data",), key=lambda up: "k-a", stage="captions")
    g.add("caps:b", node("caps:b"), ("data",), key=lambda up: "k-b", stage="captions")
    g.add("text", node("text"), ("data", "caps:a", "caps:b"), key=lambda up: f"t[{up['caps:a']}+{up['caps:b']}]")
    g.add("report", node("report"), ("text",))  # no key: writes nothing to the store
    return g


def test_resolve_runs_upstream_first_and_each_node_once():
    calls = []
    g = _graph(calls)
    assert g.resolve("text") == "text(caps:a(data()),caps:b(data()),data())"
    assert calls == ["data", "caps:a", "caps:b", "text"]
    g.resolve("caps:a")
    g.resolve("report")
    assert calls == ["data", "caps:a", "caps:b", "text", "report"]  # nothing ran twice
    assert [n for n, _ in g.timings()] == calls


def test_keys_and_live_entries_come_from_upstream_keys_without_running():
    calls = []
    g = _graph(calls)
    assert g.key("text") == "t[k-a+k-b]"
    assert g.live(["report"]) == {("data", "k-data"), ("captions", "k-a"), ("captions", "k-b"), ("text", "t[k-a+k-b]")}
    assert calls == []


def test_a_circle_or_an_unknown_node_is_an_error_naming_it():
    g = Graph()
    g.add("a", lambda up: 1, ("b",))
    g.add("b", lambda up: 2, ("a",))
    with pytest.raises(PipelineError, match="circle: a -> b -> a"):
        g.resolve("a")
    g2 = Graph()
    g2.add("a", lambda up: 1, ("missing",))
    with pytest.raises(PipelineError, match="no node 'missing' \\(read by 'a'\\)"):
        g2.order()
    with pytest.raises(PipelineError, match="declared twice"):
        g2.add("a", lambda up: 1)
