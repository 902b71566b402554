"""The CAMIM stage graph, declared once, built from one resolved :class:`Settings`.

::

    data ─► captions:<source> (one node per caption source) ─► text_features
      │
      └─► ground ─► image_features ─► image_streams        (only with an image source)
      └─► umre_objects                                      (task umre with images)

Every consumer (``features``, ``train``, ``report``, ``demo``, ``export``, ``cache gc``)
asks one graph for resolved outputs (:func:`train_inputs`) or live keys
(``graph.live()``); no stage calls an upstream stage.  One command builds one graph,
so each node runs at most once per command.

Keys: ``data`` and ``image_streams`` fold their upstream keys (and the records) into
theirs.  ``captions``, ``text_features``, ``ground`` and ``image_features`` hold
content-addressed items (an item key is the hash of the image or text it reads), so
their store key is the stage's settings alone: a new dataset adds items to the same
entry instead of splitting identical items across entries.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.graph import Graph


class _Plan:
    """Write-free views the key functions share (the records, without writing the manifest)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._ds = None

    def dataset(self):
        if self._ds is None:
            from stages.data import prepare

            self._ds = prepare(self.settings, write=False)
        return self._ds


def caption_node(mllm: str) -> str:
    return f"captions:{mllm}"


def visual_reason(settings: Settings) -> str | None:
    """Why there are no object crops (None: grounding runs)."""
    from stages.ground import ground_conf

    conf = ground_conf(settings)
    backend = conf["backend"].split(":", 1)[0]
    if backend == "imported" and not (conf["crop_dir"] or conf["trans_dir"]):
        return "ground: no crop folder (CROP_DIR) or translation images (TRANS_DIR); no object crops"
    if backend == "detector" and not settings.image_dir:
        return "ground: the detector needs the dataset images (IMAGE_DIR); no object crops"
    return None


#: the profile's sections, and the settings of those no stage declares itself
SECTIONS = {"text": None, "image": None, "ground": None, "captions": None, "train": None,
            "report": ("sources", "seeds", "name", "demo_epochs", "demo_seeds", "plan_gain", "jobs")}


def check_profile(conf: dict) -> None:
    """An unknown section (or [report] setting) is an error naming it and the known ones; the stages
    check their own sections ([text], [image], [ground], [train] with every head's options)."""
    unknown = sorted(set(conf) - set(SECTIONS) - {"tasks"})
    if unknown:
        raise PipelineError(f"profile: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)}, tasks.<task>)")
    _check_sections(conf, "")
    from stages.data import TASKS

    for task, over in (conf.get("tasks") or {}).items():
        if task not in TASKS.names():
            raise PipelineError(f"profile: [tasks.{task}]: unknown task (known: {', '.join(TASKS.names())})")
        extra = sorted(set(over) - set(SECTIONS)) if isinstance(over, dict) else [repr(over)]
        if extra:
            raise PipelineError(f"profile: [tasks.{task}] holds sections only ({', '.join(SECTIONS)}), not {', '.join(extra)}")
        _check_sections(over, f"tasks.{task}.")


def _check_sections(conf: dict, prefix: str) -> None:
    for name, known in SECTIONS.items():
        typo = sorted(set(conf.get(name) or {}) - set(known)) if known else []
        if typo:
            raise PipelineError(f"[{prefix}{name}] unknown setting(s): {', '.join(typo)} (known: {', '.join(known)})")


def build(settings: Settings, mllms: list[str] | None = None) -> Graph:
    """The graph of ``settings`` with one captions node per caption source (default: ``settings.mllms``)."""
    from stages.captions import CaptionStage, make_captioner, run_captions
    from stages.data import prepare, summary_lines
    from stages.features import run_text_features, text_stage

    check_profile(settings.conf)
    mllms = list(dict.fromkeys(mllms if mllms is not None else settings.mllms))
    plan = _Plan(settings)
    g = Graph()
    records: dict[str, list] = {}

    def rows(ds) -> list[dict]:  # the records as dicts, once per graph
        if "rows" not in records:
            records["rows"] = ds.records.to_pylist()
        return records["rows"]

    def run_data(_):
        ds = prepare(settings)
        for line in summary_lines(ds):
            print(line)
        return ds

    g.add("data", run_data, key=lambda _: plan.dataset().key)

    for m in mllms:
        def run_caps(up, m=m):
            caps = run_captions(settings, m, rows(up["data"]))
            for line in caps.lines():
                print(line)
            print(f"  -> {caps.cache.dir}")
            return caps

        g.add(caption_node(m), run_caps, ("data",), key=lambda _, m=m: CaptionStage(make_captioner(m, settings)).key,
              stage="captions")

    def run_text(up):
        feats = run_text_features(settings, rows(up["data"]), [up[caption_node(m)] for m in mllms])
        print(feats.summary.line())
        print(f"  -> {feats.cache.dir}")
        return feats

    g.add("text_features", run_text, ("data", *map(caption_node, mllms)), key=lambda _: text_stage(settings).key)

    from stages.features.visual import has_images

    if has_images(settings):
        _visual_nodes(g, settings, plan, rows)
    if settings.task == "umre":  # object boxes (and, with images, crop features) of the UMRE head
        from stages.train.umre import object_streams

        g.add("umre_objects", lambda up: object_streams(settings, rows(up["data"])), ("data",))
    return g


def _visual_nodes(g: Graph, settings: Settings, plan: _Plan, rows) -> None:
    from stages.features.visual import assemble_streams, image_stage, run_image_features, streams_key, visual_items
    from stages.ground import make_stage, run_grounding, summary_lines

    def run_ground(up):
        why = visual_reason(settings)
        if why:
            print(why)
            return None
        grounding = run_grounding(settings, rows(up["data"]))
        for line in summary_lines(grounding):
            print(line)
        return grounding

    def ground_key(_):
        if visual_reason(settings):
            return None
        try:
            return make_stage(settings)[0].key
        except PipelineError:  # e.g. a crop index that is not there: nothing of it can be live
            return None

    def run_image(up):
        feats = run_image_features(settings, visual_items(rows(up["data"]), up["ground"], Path(settings.cache_dir)))
        print(feats.summary.line())
        print(f"  -> {feats.cache.dir}")
        return feats

    def run_streams(up):
        path, meta = assemble_streams(settings, rows(up["data"]), up["ground"], up["image_features"])
        print(f"image streams: {meta['present']} -> {path}")
        return {**meta, "path": str(path)}

    g.add("ground", run_ground, ("data",), key=ground_key)
    g.add("image_features", run_image, ("data", "ground"), key=lambda _: image_stage(settings).key)
    g.add("image_streams", run_streams, ("data", "ground", "image_features"),
          key=lambda up: streams_key(settings, plan.dataset().records.to_pylist(), up["ground"] or "none", up["image_features"]))


def train_inputs(g: Graph, mllm: str) -> dict:
    """What a head's training data is built from: the resolved outputs of one caption source."""
    if caption_node(mllm) not in g:
        raise PipelineError(f"caption source {mllm!r} is not in this graph (built for: "
                            f"{', '.join(n.split(':', 1)[1] for n in g.nodes if n.startswith('captions:'))})")
    out = {"data": g.resolve("data"), "captions": g.resolve(caption_node(mllm)), "text_features": g.resolve("text_features")}
    for extra in ("image_streams", "umre_objects"):
        out[extra] = g.resolve(extra) if extra in g else None
    return out


def inputs_for(settings: Settings, mllm: str) -> dict:
    """:func:`train_inputs` of one caption source over a graph of its own."""
    return train_inputs(build(settings, [mllm]), mllm)


def resolver(settings: Settings, mllms: list[str]):
    """``resolve(mllm) -> inputs`` over one graph of ``mllms`` (each node runs once for all of them)."""
    g = build(settings, mllms)
    return lambda mllm: train_inputs(g, mllm)


def shipped_sources(settings: Settings) -> list[str]:
    """``none`` plus every caption source the task ships (the report's and demo's default)."""
    from stages.data import get_task

    return ["none"] + [f"imported:{s}" for s in get_task(settings).caption_sources(settings)]
