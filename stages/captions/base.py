"""The captioner interface. A backend is one file plus one registry entry.

A captioner turns a batch of image items into :class:`ItemResult` rows holding
``caption`` (clean text) and, where known, ``input_tokens``/``output_tokens``.
``key_config()`` holds everything that changes captions: backend, model id and
revision, the rendered prompt text, generation parameters.  Never an API key.
"""

from __future__ import annotations

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.store import ItemResult


def check_settings(section: str, given: dict, known) -> None:
    """A key of ``[<section>]`` that the backend does not read is an error naming the known ones."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise PipelineError(f"[{section}] unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(set(known)))})")


class Captioner:
    #: backend name as used in MLLM=<name>[:<arg>]
    backend = "base"
    #: False for backends that never open the image (imported, none)
    needs_images = True
    #: batch size when the user gives none (API and import backends take large ones)
    default_batch_size = 8

    def __init__(self, arg: str, settings: Settings):
        self.arg = arg
        self.settings = settings

    def key_config(self) -> dict:
        raise NotImplementedError

    def label(self) -> str:
        return f"{self.backend}:{self.arg}" if self.arg else self.backend

    def item_key(self, record: dict) -> str:
        """The caption item a record reads: by default its image (one caption per
        unique image, shared by every sample of it). A per-sample prompt (e.g. the
        entity-aware one) overrides this and ``items``."""
        return record["image_key"]

    def items(self, records: list[dict]) -> list[dict]:
        seen: dict[str, dict] = {}
        for r in records:
            k = self.item_key(r)
            if k not in seen:
                seen[k] = {"item_key": k, "img_id": r["img_id"], "image_path": r.get("image_path")}
        return list(seen.values())

    def device_name(self) -> str:
        """Where the model runs (the Ray engine asks for a GPU per worker on "cuda")."""
        return "cpu"

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def caption(self, batch: list[dict]) -> list[ItemResult]:
        raise NotImplementedError


def read_image_bytes(path: str | None) -> bytes:
    """The bytes of an item's image; ``ValueError("missing image: ...")`` when there are none."""
    if not path:
        raise ValueError("missing image: not in the image folder (set IMAGE_DIR)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"missing image: {exc.strerror or exc}") from None
