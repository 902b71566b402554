"""``MLLM=openai:<model>``: any OpenAI-compatible chat server (vLLM, SGLang, Ollama,
LM Studio, or OpenAI itself).

``POST {base_url}/chat/completions`` with the image as a base64 data URL.  The base
URL comes from ``[captions.openai] base_url`` or env ``OPENAI_BASE_URL`` (default
``http://127.0.0.1:8000/v1``, vLLM's).  The key, if the server wants one, comes from
``OPENAI_API_KEY`` (or the variable named by ``api_key_env``); local servers need none.
"""

from __future__ import annotations

import json
import os

from .api_common import ApiCaptioner, Transient, api_key, http_error


class OpenAICaptioner(ApiCaptioner):
    backend = "openai"
    conf_name = "openai"
    default_model = ""
    defaults = {**ApiCaptioner.defaults, "api_key_env": "OPENAI_API_KEY", "base_url": "", "require_key": False}

    def __init__(self, arg, settings):
        super().__init__(arg, settings)
        from pipeline.errors import PipelineError

        if not self.model:
            raise PipelineError("MLLM=openai needs the served model name: openai:<model>")
        self.base_url = (self.conf.get("base_url") or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1").rstrip("/")

    def check_key(self) -> None:
        api_key(self.conf["api_key_env"], required=bool(self.conf["require_key"]))

    def request(self, item, data_url):
        import requests

        g = self.generation()
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": item["prompt"]},
            ]}],
            **g,
        }
        headers = {"Content-Type": "application/json"}
        key = api_key(self.conf["api_key_env"], required=False)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            r = self._session.post(f"{self.base_url}/chat/completions", data=json.dumps(body).encode("utf-8"), headers=headers,
                                   timeout=float(self.conf["timeout"]))
        except requests.exceptions.Timeout as exc:
            raise Transient("timeout", type(exc).__name__) from None
        except requests.exceptions.RequestException as exc:
            raise Transient("connection", type(exc).__name__) from None
        if r.status_code != 200:
            code, msg = "", r.text
            try:
                err = r.json().get("error", {})
                if isinstance(err, dict):
                    code, msg = str(err.get("code") or err.get("type") or ""), str(err.get("message") or r.text)
                elif err:
                    msg = str(err)
            except ValueError:
                pass
            raise http_error(r.status_code, code, msg, r.headers)
        try:
            data = r.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise Transient("bad reply", "no choices[0].message.content in the reply") from None
        if isinstance(text, list):  # content parts
            text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
        usage = data.get("usage") or {}
        return str(text or ""), {"input_tokens": usage.get("prompt_tokens", 0) or 0,
                                 "output_tokens": usage.get("completion_tokens", 0) or 0}
