"""``GROUND=detector``: zero-shot detection with OWLv2 (or OWL-ViT) or Grounding DINO.

Queries per sample: the head and tail entity names, then the sentence's noun phrases
(``[ground] phrases``: ``tmr`` = TMR's grounding phrases ``phrase_text_<split>.json``
next to the crop index; ``spacy:<model>`` = spaCy noun chunks, if spaCy and the model
are installed; ``none``), cleaned (``@``/``#`` stripped, ``_`` → space), de-duplicated,
at most ``max_queries``.  Every box the model returns (``min_score`` defaults to 0: the
top m are kept, as HVPNeT's grounding toolkit keeps the best box per phrase) goes to
the shared clamp → drop degenerate → de-duplicate → top-m step.

``model``: a hub id (with ``revision``) or a local folder, e.g.
``google/owlv2-base-patch16-ensemble`` or ``IDEA-Research/grounding-dino-tiny``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from stages import encoders

from . import load_side_index

log = logging.getLogger("camim")

SPLITS = ("train", "val", "test")


def clean_query(text: str) -> str:
    text = re.sub(r"^[@#]+", "", text.strip())
    text = text.replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def build_queries(rec: dict, phrases: list[str], max_queries: int) -> list[str]:
    out, seen = [], set()
    for q in [rec.get("h_name", ""), rec.get("t_name", ""), *phrases]:
        q = clean_query(q or "")
        if q and q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    return out[:max_queries]


class DetectorGrounding:
    def __init__(self, arg: str = "", conf: dict | None = None, settings: Settings | None = None, index_dir: Path | None = None):
        self.conf = conf or {}
        if arg:  # GROUND=detector:<model>
            self.conf = {**self.conf, "model": arg}
        self.ref = encoders.resolve(self.conf["model"], self.conf.get("revision") or None)
        self.device = encoders.pick_device(settings.device if settings else "auto")
        self.compute_dtype = self.conf.get("compute_dtype", "fp32")
        if self.compute_dtype == "auto":
            self.compute_dtype = encoders.pick_dtype("auto", self.device)
        self.phrase_spec = str(self.conf.get("phrases", "tmr"))
        self.phrases = None
        if self.phrase_spec == "tmr":
            self.phrases = load_side_index(index_dir, "phrase_text", SPLITS)
            if self.phrases is None:
                log.info("ground: no phrase_text_<split>.json found; queries are the entity names only")
        elif self.phrase_spec.startswith("spacy:"):
            self._nlp = self._load_spacy(self.phrase_spec.split(":", 1)[1])
        elif self.phrase_spec != "none":
            raise PipelineError(f"[ground] phrases must be tmr, none or spacy:<model>, not {self.phrase_spec!r}")
        self.model = None

    @staticmethod
    def _load_spacy(name: str):
        try:
            import spacy
        except ImportError:
            raise PipelineError("[ground] phrases = spacy:... needs spaCy (pip install spacy and the model)") from None
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError as exc:
            raise PipelineError(f"cannot load spaCy model {name!r}: {exc}") from None

    def identity(self) -> dict:
        return {
            "kind": "detector",
            "model": self.ref.identity,
            "min_score": float(self.conf["min_score"]),
            "text_threshold": float(self.conf["text_threshold"]),
            "compute_dtype": self.compute_dtype,
        }

    def label(self) -> str:
        return f"detector {self.conf['model']}"

    def uses_image(self, view: str) -> bool:
        return True

    def _phrases(self, rec: dict) -> list[str]:
        if self.phrases is not None:
            p = self.phrases.get(rec["split"], {}).get(str(int(rec["idx"])))
            return [p] if isinstance(p, str) and p.strip() else []
        if self.phrase_spec.startswith("spacy:"):
            return [c.text for c in self._nlp(" ".join(rec["tokens"])).noun_chunks]
        return []

    def item_spec(self, rec: dict, it: dict) -> dict | None:
        return {"queries": build_queries(rec, self._phrases(rec), int(self.conf["max_queries"]))}

    def setup(self) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
        )

        kw = {"revision": self.ref.revision} if self.ref.revision else {}
        try:
            cfg = AutoConfig.from_pretrained(self.ref.load_from, **kw)
            self.kind = cfg.model_type
            if self.kind not in ("owlv2", "owlvit", "grounding-dino"):
                raise PipelineError(f"detector {self.conf['model']!r} is a {self.kind!r} model; use OWLv2, OWL-ViT or Grounding DINO")
            self.processor = AutoProcessor.from_pretrained(self.ref.load_from, **kw)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(self.ref.load_from, **kw)
        except OSError as exc:
            raise PipelineError(f"cannot load detector {self.conf['model']!r}: {str(exc).splitlines()[0]} "
                                "(offline? set [ground] model to a local folder)") from None
        model.eval().to(self.device)
        if self.compute_dtype != "fp32":
            model.to(encoders.torch_dtype(self.compute_dtype))
        self.model = model

    def teardown(self) -> None:
        self.model = None

    def propose(self, batch: list[dict]) -> list[dict]:
        return [self._one(it) for it in batch]

    def _one(self, it: dict) -> dict:
        from PIL import Image, UnidentifiedImageError

        if not it.get("image_path"):
            return {"error": f"missing image: {it['img_id']} is not in the image folder"}
        try:
            with Image.open(it["image_path"]) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return {"error": f"unreadable image: {it['image_path']}: {type(exc).__name__}: {exc}"}
        queries = it["queries"]
        if not queries:
            return {"image": image, "candidates": []}
        return {"image": image, "candidates": self._detect(image, queries)}

    def _detect(self, image, queries: list[str]) -> list[dict]:
        import torch

        w, h = image.size
        dtype = encoders.torch_dtype(self.compute_dtype)
        if self.kind == "grounding-dino":
            text = " ".join(f"{q.lower()}." for q in queries)
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        else:
            n = int(self.model.config.text_config.max_position_embeddings)
            inputs = self.processor(text=[queries], images=image, return_tensors="pt", padding="max_length", truncation=True, max_length=n)
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(**inputs)
        if self.kind == "grounding-dino":
            res = self.processor.post_process_grounded_object_detection(
                out, inputs["input_ids"], threshold=float(self.conf["min_score"]),
                text_threshold=float(self.conf["text_threshold"]), target_sizes=[(h, w)])[0]
            labels = [self._match(str(t), queries) for t in res.get("text_labels", res.get("labels", []))]
        else:
            res = self.processor.post_process_grounded_object_detection(
                out, threshold=float(self.conf["min_score"]), target_sizes=[(h, w)], text_labels=[queries])[0]
            labels = [queries[int(i)] if 0 <= int(i) < len(queries) else "" for i in res["labels"]]
        boxes = res["boxes"].float().cpu().tolist()
        scores = res["scores"].float().cpu().tolist()
        return [{"box": b, "score": s, "query": q} for b, s, q in zip(boxes, scores, labels)]

    @staticmethod
    def _match(label: str, queries: list[str]) -> str:
        lab = label.strip().lower()
        for q in queries:
            if lab and (lab in q.lower() or q.lower() in lab):
                return q
        return lab
