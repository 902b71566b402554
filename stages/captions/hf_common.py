"""What the local (transformers) caption backends share.

A backend names its model class and default checkpoint, and says how a batch of
(image, prompt) pairs becomes model inputs; this module does the rest: model
resolution (hub id + revision, or a local folder hashed by content), dtype and
device from config, seeded batched ``generate`` with left padding, decoding of the
new tokens only, and clean-up of chat-template leftovers.

Config: ``[captions.<backend>]`` in the profile (model, revision, dtype, device_map,
max_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty, seed,
batch_size); ``MLLM=<backend>:<path-or-id>`` overrides the model.  The model
identity, the rendered prompt, the dtype and the generation parameters are the
cache key; device, batch size and device map are not.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata

from pipeline.errors import PipelineError
from pipeline.store import ItemResult
from stages.encoders import pick_device, pick_dtype, resolve, torch_dtype

from .base import check_settings, read_image_bytes
from .prompts import PromptedCaptioner

log = logging.getLogger("camim")

ROLE_PREFIX = re.compile(r"^\s*(?:<\|?assistant\|?>|assistant|ASSISTANT|Assistant|Answer|ANSWER|\[/INST\])\s*[:\n]?\s*")


def load_image(path: str | None):
    """Open an image as RGB; ``ValueError`` with the reason when it is missing or bad."""
    from PIL import Image, UnidentifiedImageError

    data = read_image_bytes(path)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"bad image: {exc}") from None


class LocalCaptioner(PromptedCaptioner):
    #: [captions.<conf_name>] profile section
    conf_name = "local"
    #: the checkpoint the CAMIM paper used for this family
    default_model = ""
    #: transformers class used to load the model
    model_class = "AutoModelForImageTextToText"
    default_batch_size = 4
    trust_remote_code = False
    #: settings a backend reads beyond ``defaults`` (e.g. MiniCPM's chat_format)
    extra_settings: tuple[str, ...] = ()

    defaults = {
        "revision": "main", "dtype": "auto", "device_map": "", "max_new_tokens": 128, "num_beams": 1,
        "do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 1234,
        "attn_implementation": "",
    }

    def __init__(self, arg: str, settings):
        super().__init__(arg, settings)
        conf = dict(self.defaults)
        given = settings.section("captions").get(self.conf_name, {}) or {}
        check_settings(f"captions.{self.conf_name}", given, [*self.defaults, *self.extra_settings, "model", "batch_size"])
        conf.update(given)
        self.conf = conf
        if conf.get("batch_size"):
            self.default_batch_size = int(conf["batch_size"])
        self.ref = resolve(arg or conf.get("model") or self.default_model, conf.get("revision") or None)
        self.model = None
        self.processor = None

    def label(self) -> str:
        return f"{self.backend}:{self.ref.spec}"

    def generation(self) -> dict:
        c = self.conf
        g = {"max_new_tokens": int(c["max_new_tokens"]), "num_beams": int(c["num_beams"]), "do_sample": bool(c["do_sample"]),
             "repetition_penalty": float(c["repetition_penalty"])}
        if g["do_sample"]:
            g.update(temperature=float(c["temperature"]), top_p=float(c["top_p"]), seed=int(c["seed"]))
        return g

    def key_config(self) -> dict:
        return {"backend": self.backend, "model": self.ref.identity, "dtype": self.conf["dtype"],
                **self.prompt_key(), "generation": self.generation()}

    # -- loading -----------------------------------------------------------
    def device_name(self) -> str:
        return pick_device(self.settings.device)

    def setup(self) -> None:
        import torch
        import transformers

        self.device = pick_device(self.settings.device)
        self.dtype = torch_dtype(pick_dtype(str(self.conf["dtype"]), self.device))
        kw = {"revision": self.ref.revision} if self.ref.revision else {}
        if self.trust_remote_code:
            kw["trust_remote_code"] = True
        try:
            self.processor = self.load_processor(self.ref.load_from, kw)
            mkw = dict(kw, dtype=self.dtype)
            if self.conf.get("device_map"):
                mkw["device_map"] = self.conf["device_map"]
            if self.conf.get("attn_implementation"):
                mkw["attn_implementation"] = self.conf["attn_implementation"]
            model = self.load_model(getattr(transformers, self.model_class), self.ref.load_from, mkw)
        except OSError as exc:
            raise PipelineError(
                f"{self.backend}: cannot load {self.ref.spec} ({exc}); offline, give a local model folder: "
                f"MLLM={self.backend}:<folder>"
            ) from None
        if not self.conf.get("device_map"):
            model = model.to(self.device)
        self.model = model.eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        if getattr(tok, "padding_side", None) is not None and not self.model.config.is_encoder_decoder:
            tok.padding_side = "left"
        torch.manual_seed(int(self.conf["seed"]))

    def load_processor(self, path, kw):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kw)

    def load_model(self, cls, path, kw):
        return cls.from_pretrained(path, **kw)

    def teardown(self) -> None:
        self.model = None
        self.processor = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # -- one batch ---------------------------------------------------------
    def build_inputs(self, images: list, prompts: list[str]):
        """Model inputs for a batch (a BatchFeature with input_ids). Override."""
        return self.processor(images=images, text=prompts, padding=True, return_tensors="pt")

    def caption(self, batch: list[dict]) -> list[ItemResult]:
        results: dict[str, ItemResult] = {}
        good, images = [], []
        for it in batch:
            try:
                images.append(load_image(it.get("image_path")))
                good.append(it)
            except ValueError as exc:
                results[it["item_key"]] = ItemResult(it["item_key"], row={"img_id": it["img_id"]}, error=str(exc))
        if good:
            texts, n_in, n_out = self.generate(images, [it["prompt"] for it in good])
            for it, text, ti, to in zip(good, texts, n_in, n_out):
                text = self.clean(text)
                row = {"img_id": it["img_id"], "input_tokens": ti, "output_tokens": to}
                if text:
                    results[it["item_key"]] = ItemResult(it["item_key"], row={**row, "caption": text})
                else:
                    results[it["item_key"]] = ItemResult(it["item_key"], row=row, error="empty caption: the model generated no text")
        return [results[it["item_key"]] for it in batch]

    def generate(self, images: list, prompts: list[str]) -> tuple[list[str], list[int], list[int]]:
        import torch

        inputs = self.build_inputs(images, prompts)
        inputs = inputs.to(self.model.device)
        for k, v in list(inputs.items()):
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(self.dtype)
        g = self.generation()
        seed = g.pop("seed", None)
        torch.manual_seed(int(seed if seed is not None else self.conf["seed"]))
        with torch.inference_mode():
            out = self.model.generate(**inputs, **g)
        ids = inputs["input_ids"]
        if not self.model.config.is_encoder_decoder and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]].cpu(), ids.cpu()):
            out = out[:, ids.shape[1]:]
        tok = getattr(self.processor, "tokenizer", self.processor)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        pad = tok.pad_token_id
        n_out = [int((row != pad).sum()) if pad is not None else int(row.numel()) for row in out]
        mask = inputs.get("attention_mask")
        n_in = [int(m.sum()) for m in mask] if mask is not None else [int(ids.shape[1])] * len(texts)
        return texts, n_in, n_out

    def clean(self, text: str) -> str:
        """Strip leftovers of the chat template and special tokens; one line of text."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        for s in getattr(tok, "all_special_tokens", []) or []:
            if s:
                text = text.replace(s, " ")
        for s in ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|im_start|>", "<|eot_id|>"):
            text = text.replace(s, " ")
        # control characters and U+FFFD (a token cut inside a UTF-8 sequence)
        text = "".join(" " if (unicodedata.category(ch) == "Cc" or ch == "\ufffd") else ch for ch in text)
        prev = None
        while prev != text:
            prev = text
            text = ROLE_PREFIX.sub("", text, count=1)
        return " ".join(text.split())


class ChatTemplateCaptioner(LocalCaptioner):
    """Decoder-only VLMs whose processor has a chat template (LLaVA-NeXT, Qwen2-VL,
    native MiniCPM-V 4.x): one user turn with the image and the prompt."""

    def render_chat(self, prompt: str) -> str:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None) is None:
            raise PipelineError(f"{self.backend}: the processor of {self.ref.spec} has no chat template")
        return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)

    def build_inputs(self, images, prompts):
        texts = [self.render_chat(p) for p in prompts]
        return self.processor(images=images, text=texts, padding=True, return_tensors="pt")
