"""A fake multimodal chat server on 127.0.0.1 speaking the DashScope and the
OpenAI-compatible wire formats, for tests, benchmarks and dry runs.

    python -m stages.captions.fake_server --port 8765 --latency 0.3 --fail-rate 0.3

then ``DASHSCOPE_HTTP_BASE_URL=http://127.0.0.1:8765/api/v1 DASHSCOPE_API_KEY=sk-fake``
(or ``OPENAI_BASE_URL=http://127.0.0.1:8765/v1``) and ``make captions MLLM=...``.

It reads each image from its data URL (so a broken image is really broken) and
answers with a deterministic caption naming the image size and the prompt.  Faults
are injectable: latency, a random share of transient failures (429 with Retry-After,
500, an HTML 502, a hang past the client timeout, a dropped connection), scripted
replies for the next requests, and permanent 400s for chosen images.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DASHSCOPE_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
OPENAI_PATH = "/v1/chat/completions"
TRANSIENT_KINDS = ("429", "500", "502html", "503", "timeout", "drop")


class FakeState:
    def __init__(self, latency=0.0, fail_rate=0.0, kinds=TRANSIENT_KINDS, retry_after="0", hang=5.0, seed=0,
                 api_key=None):
        self.latency = latency
        self.fail_rate = fail_rate
        self.kinds = tuple(kinds)
        self.retry_after = retry_after  # value of the Retry-After header on 429s (None: no header)
        self.hang = hang                # seconds a "timeout" request hangs
        self.api_key = api_key          # when set, other keys get 401
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.script: list[str] = []     # forced replies for the next requests, e.g. ["429", "500"]
        self.reject: dict[str, tuple[str, str]] = {}  # sha256(image bytes) -> (code, message): 400
        self.requests = 0
        self.replies: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.times: list[float] = []
        self.auth_headers: set[str] = set()
        self.bodies: list[dict] = []
        self.keep_bodies = False

    def pick(self) -> str:
        with self.lock:
            self.requests += 1
            self.times.append(time.monotonic())
            if self.script:
                return self.script.pop(0)
            if self.fail_rate and self.rng.random() < self.fail_rate:
                return self.rng.choice(self.kinds)
            return "ok"

    def count(self, kind: str) -> None:
        with self.lock:
            self.replies[kind] = self.replies.get(kind, 0) + 1


def image_from_data_url(url: str) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("image must be a base64 data URL")
    return base64.b64decode(url.split(";base64,", 1)[1], validate=True)


def describe(data: bytes, prompt: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        mode = im.mode
    words = " ".join(prompt.split()[:6])
    return f"A {w}x{h} {mode} picture, described for the request: {words}."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls
    server_version = "FakeMLLM/1"

    def log_message(self, *args):  # quiet
        pass

    @property
    def state(self) -> FakeState:
        return self.server.state  # type: ignore[attr-defined]

    def _send(self, status: int, body, headers=None, ctype="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, flavor: str, status: int, code: str, message: str, headers=None):
        if flavor == "dashscope":
            body = {"request_id": "fake", "code": code, "message": message}
        else:
            body = {"error": {"message": message, "type": code, "code": code}}
        self._send(status, body, headers)

    def do_GET(self):  # noqa: N802
        if self.path == "/stats":
            st = self.state
            with st.lock:
                self._send(200, {"requests": st.requests, "replies": st.replies, "max_in_flight": st.max_in_flight})
        else:
            self._send(404, {"error": "no such route"})

    def do_POST(self):  # noqa: N802
        st = self.state
        flavor = "dashscope" if self.path.startswith(DASHSCOPE_PATH) else "openai" if self.path.startswith(OPENAI_PATH) else None
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if flavor is None:
            self._send(404, {"error": "no such route"})
            return
        with st.lock:
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.auth_headers.add(self.headers.get("Authorization", ""))
        try:
            self._reply(st, flavor, raw)
        finally:
            with st.lock:
                st.in_flight -= 1

    def _reply(self, st: FakeState, flavor: str, raw: bytes):
        kind = st.pick()
        if st.latency:
            time.sleep(st.latency)
        st.count(kind)
        if st.api_key is not None and self.headers.get("Authorization", "") != f"Bearer {st.api_key}":
            self._error(flavor, 401, "InvalidApiKey", "Invalid API-key provided.")
            return
        if kind == "429":
            hdr = {"Retry-After": st.retry_after} if st.retry_after is not None else {}
            self._error(flavor, 429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.", hdr)
            return
        if kind in ("500", "503"):
            self._error(flavor, int(kind), "InternalError" if kind == "500" else "ServiceUnavailable", "fake server error")
            return
        if kind == "502html":
            self._send(502, b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
                            b"<hr>nginx</body></html>", ctype="text/html")
            return
        if kind == "timeout":
            time.sleep(st.hang)
            self.close_connection = True
            return
        if kind == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if kind.startswith("400"):
            self._error(flavor, 400, "InvalidParameter", "scripted bad request")
            return
        try:
            body = json.loads(raw)
            content = body["input"]["messages"][0]["content"] if flavor == "dashscope" else body["messages"][0]["content"]
            if flavor == "dashscope":
                url = next(c["image"] for c in content if "image" in c)
                prompt = next(c["text"] for c in content if "text" in c)
            else:
                url = next(c["image_url"]["url"] for c in content if c.get("type") == "image_url")
                prompt = next(c["text"] for c in content if c.get("type") == "text")
            data = image_from_data_url(url)
        except (ValueError, KeyError, StopIteration, TypeError) as exc:
            self._error(flavor, 400, "InvalidParameter", f"malformed request: {exc}")
            return
        if st.keep_bodies:
            with st.lock:
                st.bodies.append(body)
        digest = hashlib.sha256(data).hexdigest()
        if digest in st.reject:
            code, msg = st.reject[digest]
            self._error(flavor, 400, code, msg)
            return
        try:
            text = describe(data, prompt)
        except Exception as exc:  # noqa: BLE001 - an undecodable image is the client's bad request
            self._error(flavor, 400, "InvalidParameter", f"The image could not be decoded: {type(exc).__name__}")
            return
        tin, tout = 64 + len(prompt.split()), len(text.split())
        if flavor == "dashscope":
            self._send(200, {"output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": [{"text": text}]}}]},
                             "usage": {"input_tokens": tin, "output_tokens": tout, "image_tokens": 64}, "request_id": "fake"})
        else:
            self._send(200, {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}})


class FakeServer:
    """``with FakeServer(latency=0.3) as srv: srv.dashscope_url / srv.openai_url``."""

    def __init__(self, port: int = 0, **state):
        self.state = FakeState(**state)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-mllm", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def dashscope_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    ap.add_argument("--fail-rate", type=float, default=0.0, help="share of requests failing transiently")
    ap.add_argument("--retry-after", default="0", help="Retry-After value on 429s")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    srv = FakeServer(a.port, latency=a.latency, fail_rate=a.fail_rate, retry_after=a.retry_after, seed=a.seed, hang=5.0)
    print(f"fake MLLM server: DashScope {srv.dashscope_url}  OpenAI {srv.openai_url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
