"""``MLLM=dashscope:<model>``: Qwen-VL through Alibaba Cloud's DashScope SDK.

Models: ``qwen-vl-plus`` (CAMIM's QWenVL-Plus, the default), ``qwen-vl-max``,
``qwen2.5-vl-*``, ... (not checked client-side).  Images go inline as base64 data
URLs (no OSS upload round trips).  The key comes from ``DASHSCOPE_API_KEY`` (or the
variable named by ``[captions.dashscope] api_key_env``).  The endpoint is the SDK's
default, or ``[captions.dashscope] base_url`` / env ``DASHSCOPE_HTTP_BASE_URL``.

The SDK *returns* HTTP errors (``status_code``, ``code``, ``message``) instead of
raising them; they are turned into Transient/Permanent here.  Transport errors
(``requests`` timeouts, refused or dropped connections) are raised by the SDK and
are transient.
"""

from __future__ import annotations

import os

from .api_common import ApiCaptioner, Permanent, Transient, api_key, http_error

# Estimated list prices, USD per million tokens (Model Studio, international); check
# yours and override with [captions.dashscope] price_in_per_mtok / price_out_per_mtok.
PRICES = {
    "qwen-vl-plus": (0.21, 0.63),
    "qwen-vl-max": (0.80, 3.20),
}


class DashScopeCaptioner(ApiCaptioner):
    backend = "dashscope"
    conf_name = "dashscope"
    default_model = "qwen-vl-plus"
    defaults = {**ApiCaptioner.defaults, "api_key_env": "DASHSCOPE_API_KEY", "base_url": ""}

    def model_prices(self, model, conf):
        if model in PRICES and not conf.get("price_in_per_mtok") and not conf.get("price_out_per_mtok"):
            pin, pout = PRICES[model]
            return {"price_in_per_mtok": pin, "price_out_per_mtok": pout}
        return {}

    def check_key(self) -> None:
        api_key(self.conf["api_key_env"], required=True)

    def setup(self) -> None:
        import logging

        # the SDK logs every failed request with a traceback (and can log request
        # headers at debug level): our retry policy reports failures per item instead
        logging.getLogger("dashscope").setLevel(logging.CRITICAL)
        super().setup()

    def request(self, item, data_url):
        import requests
        from dashscope import MultiModalConversation

        kwargs = {}
        base = self.conf.get("base_url") or os.environ.get("DASHSCOPE_HTTP_BASE_URL", "")
        if base:
            kwargs["base_address"] = base
        g = self.generation()
        if g.get("top_p") is not None:
            kwargs["top_p"] = g["top_p"]
        messages = [{"role": "user", "content": [{"image": data_url}, {"text": item["prompt"]}]}]
        try:
            resp = MultiModalConversation.call(
                model=self.model, messages=messages, api_key=api_key(self.conf["api_key_env"], required=True),
                max_tokens=g["max_tokens"], temperature=g["temperature"], seed=g["seed"],
                request_timeout=float(self.conf["timeout"]), session=self._session, **kwargs,
            )
        except requests.exceptions.Timeout as exc:
            raise Transient("timeout", type(exc).__name__) from None
        except requests.exceptions.RequestException as exc:
            raise Transient("connection", type(exc).__name__) from None
        status = int(getattr(resp, "status_code", 0) or 0)
        if status != 200:
            code = getattr(resp, "code", "") or ""
            raise http_error(status, "" if code == "Unknown" else code, getattr(resp, "message", "") or "",
                             getattr(resp, "headers", None) or {})
        try:
            content = resp.output.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            raise Transient("bad reply", "no output.choices[0].message.content") from None
        if isinstance(content, list):
            text = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
        else:
            text = str(content or "")
        usage = resp.usage or {}
        get = usage.get if hasattr(usage, "get") else (lambda k, d=0: getattr(usage, k, d))
        return text, {"input_tokens": get("input_tokens", 0) or 0, "output_tokens": get("output_tokens", 0) or 0}


__all__ = ["DashScopeCaptioner", "Permanent", "Transient"]
