"""A fake multimodal chat server on 127.0.0.1 speaking the DashScope and the
OpenAI-compatible wire formats, for tests, benchmarks and dry runs.

    python -m stages.captions.fake_server --port 8765 --latency 0.3 --fail-rate 0.3

then ``DASHSCOPE_HTTP_BASE_URL=http://127.0.0.1:8765/api/v1 DASHSCOPE_API_KEY=sk-fake``
(or ``OPENAI_BASE_URL=http://127.0.0.1:8765/v1``) and ``make captions MLLM=...``.

It also serves the Batch API (``/v1/files``, ``/v1/batches``, ``/v1/batches/<id>``,
``/v1/files/<id>/content``; a job completes after ``polls_to_finish`` polls), and
``python -m stages.captions.fake_server run-batch -i in.jsonl -o out.jsonl`` stands in
for ``vllm run-batch``.

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
        # the Batch API (OpenAI's, which DashScope's compatible mode shares)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batches_created = 0
        self.batch_polls = 0
        self.polls_to_finish = 2        # GETs of a job before it reports completed (a large number: never)

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
        st = self.state
        if self.path == "/stats":
            with st.lock:
                self._send(200, {"requests": st.requests, "replies": st.replies, "max_in_flight": st.max_in_flight})
        elif self.path.startswith("/v1/batches/"):
            with st.lock:
                job = st.batches.get(self.path.rsplit("/", 1)[1])
                if job is not None:
                    st.batch_polls += 1
                    job["polls"] += 1
                    if job["status"] != "completed" and job["polls"] >= st.polls_to_finish:
                        job["status"] = "completed"
                        job["request_counts"]["completed"] = job["request_counts"]["total"]
                    elif job["status"] == "validating":
                        job["status"] = "in_progress"
            if job is None:
                self._error("openai", 404, "not_found", "no such batch")
            else:
                self._send(200, {k: v for k, v in job.items() if k not in ("polls", "_out", "_err")}
                           | ({"output_file_id": job["_out"], "error_file_id": job["_err"]} if job["status"] == "completed" else {}))
        elif self.path.startswith("/v1/files/") and self.path.endswith("/content"):
            data = st.files.get(self.path.split("/")[3])
            if data is None:
                self._error("openai", 404, "not_found", "no such file")
            else:
                self._send(200, data, ctype="application/jsonl")
        else:
            self._send(404, {"error": "no such route"})

    def _batch_post(self, raw: bytes) -> None:
        """``POST /v1/files`` (multipart, purpose batch) and ``POST /v1/batches``."""
        st = self.state
        if self.path == "/v1/files":
            import email.parser
            import email.policy

            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
            data = next((p.get_payload(decode=True) for p in msg.iter_parts() if p.get_filename()), None)
            if data is None:
                self._error("openai", 400, "invalid_request_error", "no file in the upload")
                return
            with st.lock:
                fid = f"file-{len(st.files) + 1}"
                st.files[fid] = data
            self._send(200, {"id": fid, "object": "file", "purpose": "batch", "bytes": len(data)})
            return
        body = json.loads(raw)
        src = st.files.get(body.get("input_file_id", ""))
        if src is None:
            self._error("openai", 400, "invalid_request_error", "unknown input_file_id")
            return
        out, err = batch_lines(st, src.decode("utf-8"))
        with st.lock:
            st.batches_created += 1
            bid = f"batch_{st.batches_created}"
            oid, eid = f"file-{len(st.files) + 1}", f"file-{len(st.files) + 2}"
            st.files[oid] = ("\n".join(out) + "\n").encode()
            st.files[eid] = ("\n".join(err) + "\n").encode()
            st.batches[bid] = {"id": bid, "object": "batch", "status": "validating", "input_file_id": body["input_file_id"],
                               "endpoint": body.get("endpoint"), "polls": 0, "_out": oid, "_err": eid if err else None,
                               "request_counts": {"total": len(out) + len(err), "completed": 0, "failed": len(err)}}
        self._send(200, {"id": bid, "object": "batch", "status": "validating"})

    def do_POST(self):  # noqa: N802
        st = self.state
        if self.path in ("/v1/files", "/v1/batches"):
            length = int(self.headers.get("Content-Length") or 0)
            self._batch_post(self.rfile.read(length) if length else b"")
            return
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
        except ValueError as exc:
            self._error(flavor, 400, "InvalidParameter", f"malformed request: {exc}")
            return
        status, payload = chat_answer(st, flavor, body)
        if status != 200:
            self._error(flavor, status, payload["code"], payload["message"])
        else:
            self._send(200, payload)


def chat_answer(st: FakeState, flavor: str, body: dict) -> tuple[int, dict]:
    """One chat request's answer: ``(200, reply)`` or ``(400, {"code", "message"})``."""
    try:
        content = body["input"]["messages"][0]["content"] if flavor == "dashscope" else body["messages"][0]["content"]
        if flavor == "dashscope":
            url = next(c["image"] for c in content if "image" in c)
            prompt = next(c["text"] for c in content if "text" in c)
        else:
            url = next(c["image_url"]["url"] for c in content if c.get("type") == "image_url")
            prompt = next(c["text"] for c in content if c.get("type") == "text")
        data = image_from_data_url(url)
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        return 400, {"code": "InvalidParameter", "message": f"malformed request: {exc}"}
    if st.keep_bodies:
        with st.lock:
            st.bodies.append(body)
    digest = hashlib.sha256(data).hexdigest()
    if digest in st.reject:
        code, msg = st.reject[digest]
        return 400, {"code": code, "message": msg}
    try:
        text = describe(data, prompt)
    except Exception as exc:  # noqa: BLE001 - an undecodable image is the client's bad request
        return 400, {"code": "InvalidParameter", "message": f"The image could not be decoded: {type(exc).__name__}"}
    tin, tout = 64 + len(prompt.split()), len(text.split())
    if flavor == "dashscope":
        return 200, {"output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": [{"text": text}]}}]},
                     "usage": {"input_tokens": tin, "output_tokens": tout, "image_tokens": 64}, "request_id": "fake"}
    return 200, {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}}


def batch_lines(st: FakeState, jsonl: str) -> tuple[list[str], list[str]]:
    """The output and error lines of a batch input file (OpenAI's batch line format)."""
    out, err = [], []
    for i, line in enumerate(x for x in jsonl.splitlines() if x.strip()):
        req = json.loads(line)
        status, payload = chat_answer(st, "openai", req.get("body") or {})
        if status == 200:
            out.append(json.dumps({"id": f"req-{i}", "custom_id": req.get("custom_id"), "error": None,
                                   "response": {"status_code": 200, "request_id": f"fake-{i}", "body": payload}}))
        else:
            err.append(json.dumps({"id": f"req-{i}", "custom_id": req.get("custom_id"), "error": None,
                                   "response": {"status_code": status, "request_id": f"fake-{i}",
                                                "body": {"error": {"code": payload["code"], "message": payload["message"]}}}}))
    return out, err


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


def run_batch(argv: list[str]) -> None:
    """``run-batch -i <in.jsonl> -o <out.jsonl>``: what ``vllm run-batch`` does, with the fake answers."""
    import argparse

    ap = argparse.ArgumentParser(prog="fake_server run-batch")
    ap.add_argument("-i", required=True)
    ap.add_argument("-o", required=True)
    ap.add_argument("--model", default="")
    a = ap.parse_args(argv)
    with open(a.i, encoding="utf-8") as f:
        out, err = batch_lines(FakeState(), f.read())
    with open(a.o, "w", encoding="utf-8") as f:
        f.write("\n".join(out + err) + "\n")


def main(argv=None) -> None:
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run-batch"]:
        run_batch(argv[1:])
        return

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
