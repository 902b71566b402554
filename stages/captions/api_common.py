"""What every API caption backend shares: retries, bounded concurrency, RPM/TPM
limits, image encoding, and token/cost accounting.

A backend subclasses :class:`ApiCaptioner` and implements ``request(item, data_url)``
returning ``(text, usage)`` or raising :class:`Transient` (retried) /
:class:`Permanent` (recorded for the item, never retried).

Retry policy (tenacity): timeouts, connection errors, 408, 409, 429 and 5xx are
retried with exponential backoff and full jitter, up to ``max_attempts``; a server's
``Retry-After`` (seconds or HTTP date) or ``retry-after-ms`` replaces the backoff for
that wait (capped at ``max_wait``).  Everything else (400 bad request or content
inspection, 401/403 auth, 404 model) is permanent.

Configuration: ``[captions.<backend>]`` in the profile, then the environment
(``CAPTION_CONCURRENCY``, ``CAPTION_RPM``, ``CAPTION_TPM``, ``CAPTION_TIMEOUT``,
``CAPTION_MAX_ATTEMPTS``).  None of these enter the cache key; the model, the
rendered prompt and the generation parameters do.  API keys are read from the
environment only, at call time, and never stored, logged or hashed.
"""

from __future__ import annotations

import base64
import email.utils
import io
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from pipeline.errors import PipelineError
from pipeline.store import ItemResult

from .base import check_settings, read_image_bytes
from .prompts import PromptedCaptioner

log = logging.getLogger("camim")

RETRY_STATUS = frozenset({408, 409, 429})


class Transient(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) when the server said so."""

    def __init__(self, reason: str, message: str = "", retry_after: float | None = None):
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{reason}: {message}" if message else reason)


class Permanent(Exception):
    """A failure that retrying cannot fix (400, content inspection, auth, ...)."""

    def __init__(self, reason: str, message: str = ""):
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}" if message else reason)


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUS or 500 <= status <= 599


def http_error(status: int, code: str, message: str, headers=None) -> Exception:
    """The exception for a non-2xx reply: Transient or Permanent by status."""
    reason = f"http {status}" + (f" {code}" if code else "")
    message = short_text(message)
    if is_retryable_status(status):
        return Transient(reason, message, parse_retry_after(headers or {}))
    return Permanent(reason, message)


def short_text(body: str, limit: int = 300) -> str:
    """One line of an error body (HTML pages are reduced to their text)."""
    import re

    text = body or ""
    if "<" in text and ">" in text:
        text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
        text = re.sub(r"(?s)<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def parse_retry_after(headers) -> float | None:
    """``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date; None if absent/bad."""
    h = {str(k).lower(): v for k, v in dict(headers).items()}
    ms = h.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = h.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(ra))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    max_attempts: int = 8
    base: float = 0.5      # first backoff (s); doubles each attempt
    max_wait: float = 30.0  # cap of one wait, also of a server's Retry-After

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        ra = getattr(exc, "retry_after", None)
        if ra is not None:
            return min(float(ra), self.max_wait)
        # full jitter: uniform in [0, base * 2^(n-1)], capped
        return random.uniform(0, min(self.max_wait, self.base * (2 ** (state.attempt_number - 1))))

    def retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.max_attempts),
            wait=self.wait,
            reraise=True,
        )


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by all worker threads.

    Requests are spaced evenly (``60/rpm`` apart, no bursts), so a limit is held over
    any window.  Tokens use a bucket of ``tpm`` refilled continuously: a request
    reserves its estimate before it is sent, and ``settle`` corrects the bucket with
    the tokens the server reports.  0 means unlimited.
    """

    def __init__(self, rpm: float = 0, tpm: float = 0, clock=time.monotonic, sleep=time.sleep):
        self.rpm = float(rpm or 0)
        self.tpm = float(tpm or 0)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0
        self._tokens = self.tpm
        self._t_tokens = clock()

    def __getstate__(self):  # picklable; a copy limits alone (Ray workers share one through on_ray)
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Book the next request slot; the seconds to wait until it (0 without an rpm limit)."""
        if self.rpm <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + 60.0 / self.rpm
        return slot - now

    def take(self, need: float) -> float:
        """Take ``need`` tokens if the bucket holds them (returns 0), else the seconds until it will."""
        with self._lock:
            self._refill()
            if self._tokens >= need:
                self._tokens -= need
                return 0.0
            return (need - self._tokens) * 60.0 / self.tpm

    def acquire(self, est_tokens: int = 0) -> None:
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        if self.tpm > 0 and est_tokens > 0:
            need = min(float(est_tokens), self.tpm)
            while (wait := self.take(need)) > 0:
                self._sleep(min(wait, 1.0))

    def on_ray(self) -> "RateLimiter | RayRateLimiter":
        """One limiter for every Ray worker: the bucket moves into a Ray actor, and the copies the
        workers get ask it for their slots (so ``rpm``/``tpm`` mean the whole job, not each worker)."""
        if self.rpm <= 0 and self.tpm <= 0:
            return self
        import ray

        actor = ray.remote(num_cpus=0)(_LimiterActor).remote(self.rpm, self.tpm)
        return RayRateLimiter(actor, self.rpm, self.tpm)

    def settle(self, estimated: int, actual: int) -> None:
        if self.tpm > 0:
            with self._lock:
                self._refill()
                self._tokens -= float(actual) - float(min(estimated, self.tpm))

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.tpm, self._tokens + (now - self._t_tokens) * self.tpm / 60.0)
        self._t_tokens = now


class _LimiterActor:
    """The bucket of a :class:`RayRateLimiter`: books slots and tokens, never sleeps (the callers do)."""

    def __init__(self, rpm: float, tpm: float):
        self.lim = RateLimiter(rpm, tpm)

    def reserve(self) -> float:
        return self.lim.reserve()

    def take(self, need: float) -> float:
        return self.lim.take(need)

    def settle(self, estimated: int, actual: int) -> None:
        self.lim.settle(estimated, actual)


class RayRateLimiter:
    """A worker's handle on the job-wide bucket held by one Ray actor (see :meth:`RateLimiter.on_ray`)."""

    def __init__(self, actor, rpm: float, tpm: float, sleep=time.sleep):
        self.actor, self.rpm, self.tpm, self._sleep = actor, float(rpm), float(tpm), sleep

    def reserve(self) -> float:
        import ray

        return ray.get(self.actor.reserve.remote()) if self.rpm > 0 else 0.0

    def take(self, need: float) -> float:
        import ray

        return ray.get(self.actor.take.remote(need))

    acquire = RateLimiter.acquire  # the same waiting, on the actor's bookings

    def settle(self, estimated: int, actual: int) -> None:
        if self.tpm > 0:
            self.actor.settle.remote(estimated, actual)


def counting_session_class():
    import requests

    class CountingSession(requests.Session):
        """Counts every HTTP request sent, per thread and per attempt.  The DashScope SDK resends
        once by itself when a pooled connection drops; that resend goes through here too, so it is
        counted as an attempt and waits for the rate limiter like any other request."""

        def __init__(self, limiter=None):
            super().__init__()
            self._local = threading.local()
            self.limiter = limiter

        def begin(self) -> None:
            self._local.sends = 0

        def sends(self) -> int:
            return getattr(self._local, "sends", 0)

        def send(self, request, **kwargs):
            n = self.sends()
            if n >= 1 and self.limiter is not None:  # a resend inside one attempt
                self.limiter.acquire(0)
            self._local.sends = n + 1
            return super().send(request, **kwargs)

    return CountingSession


def image_data_url(path: str | None) -> str:
    """Read an image, check it decodes, and return it as a base64 data URL.

    Raises ``ValueError`` with the reason for a missing or unreadable image.
    """
    from PIL import Image, UnidentifiedImageError

    data = read_image_bytes(path)
    try:  # the header only: the server decodes the rest (a broken body comes back as a 400)
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"bad image: {exc}") from None
    if fmt not in ("jpeg", "png", "webp", "gif", "bmp"):
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, "PNG")
        data, fmt = buf.getvalue(), "png"
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def api_key(env_name: str, required: bool) -> str | None:
    """The key from the environment variable ``env_name`` (never from config files)."""
    key = os.environ.get(env_name, "").strip()
    if required and not key:
        raise PipelineError(f"no API key: set the environment variable {env_name}")
    return key or None


def _env_num(name: str, default, cast=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise PipelineError(f"{name}={raw!r} is not a number") from None


class ApiCaptioner(PromptedCaptioner):
    """Base of the API backends: runs each batch through a bounded thread pool."""

    #: the profile section [captions.<conf_name>]
    conf_name = "api"
    default_model = ""
    #: defaults for [captions.<conf_name>]; a subclass extends this
    defaults = {
        "concurrency": 8, "rpm": 0, "tpm": 0, "timeout": 60.0, "max_attempts": 8, "backoff_base": 0.5,
        "backoff_max": 30.0, "max_tokens": 512, "temperature": 0.0, "top_p": None, "seed": 1234,
        "est_tokens": 1500, "price_in_per_mtok": 0.0, "price_out_per_mtok": 0.0,
        # --dry-run: output tokens per caption when no item of this key has been captioned yet
        # (CAMIM's captions, in the MiniLM tokenizer: BLIP-2 ~13, QwenVL-Plus ~38, MiniCPM-V ~90)
        "est_output_tokens": 120,
    }

    def __init__(self, arg: str, settings):
        super().__init__(arg, settings)
        self.model = arg or self.default_model
        conf = dict(self.defaults)
        given = settings.section("captions").get(self.conf_name, {}) or {}
        check_settings(f"captions.{self.conf_name}", given, [*self.defaults, "batch_size"])
        conf.update(given)
        conf.update(self.model_prices(self.model, conf))
        conf["concurrency"] = int(_env_num("CAPTION_CONCURRENCY", conf["concurrency"]))
        conf["rpm"] = _env_num("CAPTION_RPM", conf["rpm"])
        conf["tpm"] = _env_num("CAPTION_TPM", conf["tpm"])
        conf["timeout"] = _env_num("CAPTION_TIMEOUT", conf["timeout"])
        conf["max_attempts"] = int(_env_num("CAPTION_MAX_ATTEMPTS", conf["max_attempts"]))
        if conf["concurrency"] < 1:
            raise PipelineError(f"captions.{self.conf_name}.concurrency must be >= 1")
        self.conf = conf
        self.policy = RetryPolicy(int(conf["max_attempts"]), float(conf["backoff_base"]), float(conf["backoff_max"]))
        self.limiter = RateLimiter(conf["rpm"], conf["tpm"])
        self._pool: ThreadPoolExecutor | None = None

    # One batch = one committed part.  The workers drain at the end of each batch
    # (about half a request latency lost), so a batch holds ~32 requests per worker:
    # ~1.5% drain loss, and a kill loses at most ~32 latencies of work (~10 s at 300 ms).
    @property
    def default_batch_size(self) -> int:  # type: ignore[override]
        return max(64, 32 * int(self.conf["concurrency"]))

    def image_tokens(self, path: str | None) -> int:
        """Input tokens of one image: Qwen-VL models (DashScope, and Qwen2-VL behind vLLM) spend one
        token per 28x28 patch of the resized image, between 4 and 1280, plus 2 markers."""
        import math

        from PIL import Image

        try:
            with Image.open(path) as im:  # the header only
                w, h = im.size
        except (OSError, ValueError, TypeError):
            return 0
        return min(max(math.ceil(w / 28) * math.ceil(h / 28), 4), 1280) + 2

    def estimate(self, items: list[dict], measured_out: float | None = None) -> dict:
        """Tokens and cost of sending ``items`` (nothing is sent): input = image tokens + the prompt
        (about 4 characters a token) + the chat template; output = the mean of what this key's
        captions already used, else ``est_output_tokens``; and the bound at ``max_tokens``."""
        tin = sum(self.image_tokens(it.get("image_path")) + len(it.get("prompt", "")) // 4 + 16 for it in items)
        per_out = measured_out if measured_out else float(self.conf["est_output_tokens"])
        tout = int(per_out * len(items))
        tmax = int(self.conf["max_tokens"]) * len(items)
        pin, pout = float(self.conf["price_in_per_mtok"]), float(self.conf["price_out_per_mtok"])
        return {"input_tokens": tin, "output_tokens": tout, "output_tokens_max": tmax,
                "cost_usd": (tin * pin + tout * pout) / 1e6, "cost_usd_max": (tin * pin + tmax * pout) / 1e6,
                "output_from": "measured" if measured_out else "default", "priced": bool(pin or pout)}

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD at the configured prices (per million tokens)."""
        return (tokens_in * float(self.conf["price_in_per_mtok"]) + tokens_out * float(self.conf["price_out_per_mtok"])) / 1e6

    def model_prices(self, model: str, conf: dict) -> dict:
        """Per-model default prices (USD per million tokens); config wins."""
        return {}

    def generation(self) -> dict:
        """Generation parameters: they change captions, so they are in the key."""
        g = {"max_tokens": self.conf["max_tokens"], "temperature": self.conf["temperature"], "seed": self.conf["seed"]}
        if self.conf.get("top_p") is not None:
            g["top_p"] = self.conf["top_p"]
        return g

    def key_config(self) -> dict:
        return {"backend": self.backend, "model": self.model, **self.prompt_key(), "generation": self.generation()}

    def label(self) -> str:
        return f"{self.backend}:{self.model}"

    def setup(self) -> None:
        self.check_key()
        self._pool = ThreadPoolExecutor(max_workers=int(self.conf["concurrency"]), thread_name_prefix=f"{self.backend}-api")
        self._session = make_session(int(self.conf["concurrency"]), self.limiter)

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if getattr(self, "_session", None) is not None:
            self._session.close()
            self._session = None

    def for_workers(self, engine: str) -> None:
        """Copies of this captioner are about to run in other processes: one rate limit for them all."""
        if engine == "ray":
            self.limiter = self.limiter.on_ray()

    def check_key(self) -> None:
        """Fail before any request when the key is required and absent."""

    def request(self, item: dict, data_url: str) -> tuple[str, dict]:
        """One request → (caption text, usage {input_tokens, output_tokens}). Raise Transient/Permanent."""
        raise NotImplementedError

    def caption(self, batch: list[dict]) -> list[ItemResult]:
        if self._pool is None:
            self.setup()
        futures = [self._pool.submit(self._one, it) for it in batch]
        return [f.result() for f in futures]

    def _one(self, item: dict) -> ItemResult:
        base = {"img_id": item["img_id"]}
        try:
            url = image_data_url(item.get("image_path"))
        except ValueError as exc:
            return ItemResult(item["item_key"], row=base, error=str(exc))
        attempts = 0
        t0 = time.perf_counter()
        est = int(self.conf["est_tokens"])

        session = getattr(self, "_session", None)

        def attempt():
            nonlocal attempts
            attempts += 1
            self.limiter.acquire(est)
            if session is not None:
                session.begin()
            try:
                text, usage = self.request(item, url)
            except Transient:
                self.limiter.settle(est, 0)
                raise
            finally:  # an SDK's own resend (DashScope: once on a dropped connection) is a request too
                if session is not None:
                    attempts += max(0, session.sends() - 1)
            self.limiter.settle(est, int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0)))
            return text, usage

        try:
            text, usage = self.policy.retrying()(attempt)
        except Transient as exc:
            return ItemResult(item["item_key"], row={**base, "attempts": attempts},
                              error=f"transient {exc.reason}: gave up after {attempts} attempts" + (f": {exc.message}" if exc.message else ""))
        except Permanent as exc:
            return ItemResult(item["item_key"], row={**base, "attempts": attempts}, error=f"{exc.reason}: {exc.message}")
        text = " ".join((text or "").split())
        if not text:
            return ItemResult(item["item_key"], row={**base, "attempts": attempts}, error="empty caption: the model returned no text")
        tin, tout = int(usage.get("input_tokens", 0) or 0), int(usage.get("output_tokens", 0) or 0)
        cost = self.cost(tin, tout)
        return ItemResult(item["item_key"], row={
            **base, "caption": text, "input_tokens": tin, "output_tokens": tout, "cost_usd": cost,
            "attempts": attempts, "seconds": round(time.perf_counter() - t0, 3),
        })


def make_session(pool_size: int, limiter: "RateLimiter | None" = None):
    """A requests session whose connection pool fits ``pool_size`` worker threads and that
    counts what it really sends (see :class:`CountingSession`)."""
    from requests.adapters import HTTPAdapter

    s = counting_session_class()(limiter)
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, pool_size), max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s
