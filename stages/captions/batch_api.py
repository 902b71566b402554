"""Batch APIs at half price: ``MLLM=openai-batch:<model>``, ``dashscope-batch:<model>``, ``vllm-batch:<model>``.

One runner batch (by default every image still to caption) becomes one provider batch job:

1. build the JSONL of chat requests (``custom_id`` = the item key; the image inline as a data URL);
2. ``openai-batch`` / ``dashscope-batch``: upload it (``POST {base}/files``, purpose ``batch``), create
   the job (``POST {base}/batches``), poll (``GET {base}/batches/<id>``) every ``poll_seconds``,
   download the output and error files (``GET {base}/files/<id>/content``);
   ``vllm-batch``: run ``vllm run-batch`` (``vllm_command``) on the JSONL, locally;
3. map every line back to its item: a caption, or a failure recorded on that item (4xx lines are
   permanent; 429/5xx lines and lines the job never answered are transient, so the next run
   sends them again in a new job).

The job's id is recorded in the cache (``captions/<key>/files/batches.json``) before the first
poll, so a run killed while polling resumes polling the same job instead of paying twice.

DashScope's Batch API is OpenAI-compatible (``https://dashscope.aliyuncs.com/compatible-mode/v1``,
key ``DASHSCOPE_API_KEY``).  Prices in ``[captions.<conf>]`` are real-time list prices; the
estimate and the recorded ``cost_usd`` apply ``batch_discount`` (0.5: both providers bill batch
jobs at half price).  Captions of a batch backend live under their own key (``backend`` is in it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import key_of
from pipeline.store import ItemResult, Store, atomic_write_bytes, atomic_write_json

from .api_common import api_key, image_data_url, is_retryable_status
from .dashscope_api import PRICES as DASHSCOPE_PRICES
from .openai_compat import OpenAICaptioner

TERMINAL = ("completed", "failed", "expired", "cancelled")


class OpenAIBatchCaptioner(OpenAICaptioner):
    backend = "openai-batch"
    conf_name = "openai_batch"
    defaults = {**OpenAICaptioner.defaults, "poll_seconds": 30.0, "completion_window": "24h", "batch_discount": 0.5,
                "max_items": 50_000, "max_wait_hours": 26.0}

    def __init__(self, arg, settings):
        super().__init__(arg, settings)
        d = float(self.conf["batch_discount"])
        self.conf["price_in_per_mtok"] = float(self.conf["price_in_per_mtok"]) * d
        self.conf["price_out_per_mtok"] = float(self.conf["price_out_per_mtok"]) * d
        self._store_root = settings.cache_dir

    @property
    def records_path(self) -> Path:
        """``captions/<key>/files/batches.json``: the jobs submitted and not yet mapped back."""
        from . import CaptionStage

        return Store(self._store_root).stage("captions", CaptionStage(self).key).files_dir / "batches.json"

    @property
    def default_batch_size(self) -> int:  # type: ignore[override]
        return int(self.conf["max_items"])

    def setup(self) -> None:
        self.check_key()
        import requests

        self._session = requests.Session()

    # -- the record of submitted jobs -------------------------------------------------------
    def _records(self) -> dict:
        try:
            return json.loads(self.records_path.read_text())
        except (OSError, ValueError):
            return {}

    def _record(self, bkey: str, doc: dict | None) -> None:
        rec = self._records()
        if doc is None:
            rec.pop(bkey, None)
        else:
            rec[bkey] = doc
        atomic_write_json(self.records_path, rec)

    # -- one runner batch = one job ---------------------------------------------------------
    def caption(self, batch: list[dict]) -> list[ItemResult]:
        out: dict[str, ItemResult] = {}
        lines = []
        for it in batch:
            try:
                url = image_data_url(it.get("image_path"))
            except ValueError as exc:
                out[it["item_key"]] = ItemResult(it["item_key"], row={"img_id": it["img_id"]}, error=str(exc))
                continue
            lines.append(json.dumps({"custom_id": it["item_key"], "method": "POST", "url": "/v1/chat/completions",
                                     "body": self.chat_body(it, url)}))
        todo = [it for it in batch if it["item_key"] not in out]
        if todo:
            bkey = key_of(sorted(it["item_key"] for it in todo))
            answers = self.run_job(bkey, ("\n".join(lines) + "\n").encode("utf-8"), len(todo))
            for it in todo:
                out[it["item_key"]] = self.result(it, answers.get(it["item_key"]))
            self._record(bkey, None)  # mapped back: the part the runner commits next holds the results
        return [out[it["item_key"]] for it in batch]

    def chat_body(self, item: dict, data_url: str) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": item["prompt"]}]}],
            **self.generation()}

    def result(self, item: dict, answer: dict | None) -> ItemResult:
        base = {"img_id": item["img_id"], "attempts": 1}
        if answer is None:
            return ItemResult(item["item_key"], row=base, error="transient batch: the job returned no line for this item")
        resp = answer.get("response") or {}
        status = int(resp.get("status_code") or 0)
        body = resp.get("body") or {}
        if status != 200:
            err = answer.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
            msg = err.get("message", "") if isinstance(err, dict) else str(err)
            kind = "transient batch" if not status or is_retryable_status(status) else f"batch {status}"
            return ItemResult(item["item_key"], row=base, error=f"{kind}: {msg or 'no message'}")
        try:
            text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return ItemResult(item["item_key"], row=base, error="transient batch: no choices[0].message.content in the line")
        text = " ".join(str(text or "").split())
        if not text:
            return ItemResult(item["item_key"], row=base, error="empty caption: the model returned no text")
        usage = body.get("usage") or {}
        tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return ItemResult(item["item_key"], row={**base, "caption": text, "input_tokens": tin, "output_tokens": tout,
                                                 "cost_usd": self.cost(tin, tout), "batch_id": answer.get("_batch_id", "")})

    # -- the provider's Batch API ------------------------------------------------------------
    def _headers(self, json_body: bool = True) -> dict:
        h = {"Content-Type": "application/json"} if json_body else {}
        key = api_key(self.conf["api_key_env"], required=bool(self.conf["require_key"]))
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _call(self, method: str, path: str, **kw):
        import requests

        try:
            r = self._session.request(method, f"{self.base_url}{path}", timeout=float(self.conf["timeout"]), **kw)
        except requests.exceptions.RequestException as exc:
            raise PipelineError(f"batch API {method} {path}: {type(exc).__name__} (the job id, if any, is kept: run again to "
                                "resume)") from None
        if r.status_code != 200:
            raise PipelineError(f"batch API {method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def run_job(self, bkey: str, jsonl: bytes, n: int) -> dict[str, dict]:
        rec = self._records().get(bkey)
        if rec and rec.get("batch_id"):
            print(f"captions {self.label()}: resuming batch job {rec['batch_id']} ({n} items), submitted before")
            batch_id = rec["batch_id"]
        else:
            up = self._call("POST", "/files", headers=self._headers(False), data={"purpose": "batch"},
                            files={"file": (f"{bkey}.jsonl", jsonl, "application/jsonl")}).json()
            job = self._call("POST", "/batches", headers=self._headers(), data=json.dumps({
                "input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                "completion_window": self.conf["completion_window"], "metadata": {"camim_key": bkey}})).json()
            batch_id = job["id"]
            self._record(bkey, {"batch_id": batch_id, "input_file_id": up["id"], "items": n, "submitted": time.time()})
            print(f"captions {self.label()}: submitted batch job {batch_id} ({n} items); polling every "
                  f"{float(self.conf['poll_seconds']):g}s (a killed run resumes polling it)")
        job = self.poll(batch_id)
        answers: dict[str, dict] = {}
        for fid in (job.get("output_file_id"), job.get("error_file_id")):
            if fid:
                for line in self._call("GET", f"/files/{fid}/content", headers=self._headers(False)).text.splitlines():
                    if line.strip():
                        a = json.loads(line)
                        a["_batch_id"] = batch_id
                        answers.setdefault(a.get("custom_id"), a)
        if job.get("status") != "completed":
            print(f"captions {self.label()}: batch job {batch_id} ended {job.get('status')}; "
                  f"{len(answers)} of {n} items answered, the rest are retried by the next run")
        return answers

    def poll(self, batch_id: str) -> dict:
        end = time.monotonic() + float(self.conf["max_wait_hours"]) * 3600
        last = None
        while True:
            job = self._call("GET", f"/batches/{batch_id}", headers=self._headers(False)).json()
            status = job.get("status")
            if status in TERMINAL:
                return job
            counts = job.get("request_counts") or {}
            if status != last:
                print(f"captions {self.label()}: batch job {batch_id} {status} "
                      f"({counts.get('completed', 0)}/{counts.get('total', '?')} done)")
                last = status
            if time.monotonic() > end:
                raise PipelineError(f"batch job {batch_id} still {status} after {self.conf['max_wait_hours']} h; run again to "
                                    "resume polling")
            time.sleep(float(self.conf["poll_seconds"]))


class DashScopeBatchCaptioner(OpenAIBatchCaptioner):
    backend = "dashscope-batch"
    conf_name = "dashscope_batch"
    default_model = "qwen-vl-plus"
    defaults = {**OpenAIBatchCaptioner.defaults, "api_key_env": "DASHSCOPE_API_KEY", "require_key": True,
                "base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1"}

    def __init__(self, arg, settings):
        super().__init__(arg or self.default_model, settings)

    def model_prices(self, model, conf):
        if model in DASHSCOPE_PRICES and not conf.get("price_in_per_mtok") and not conf.get("price_out_per_mtok"):
            pin, pout = DASHSCOPE_PRICES[model]
            return {"price_in_per_mtok": pin, "price_out_per_mtok": pout}
        return {}


class VllmBatchCaptioner(OpenAIBatchCaptioner):
    """The same JSONL through ``vllm run-batch`` on this machine (no server, no upload)."""

    backend = "vllm-batch"
    conf_name = "vllm_batch"
    defaults = {**OpenAIBatchCaptioner.defaults, "batch_discount": 1.0, "require_key": False,
                "vllm_command": "vllm run-batch -i {input} -o {output} --model {model}"}

    def setup(self) -> None:
        pass

    def run_job(self, bkey: str, jsonl: bytes, n: int) -> dict[str, dict]:
        work = self.records_path.parent / "vllm-batch"
        work.mkdir(parents=True, exist_ok=True)
        src, dst = work / f"{bkey}.input.jsonl", work / f"{bkey}.output.jsonl"
        atomic_write_bytes(src, jsonl)
        if not dst.exists():  # a finished output of an earlier, killed run is read, not recomputed
            cmd = [a.format(input=src, output=f"{dst}.part", model=self.model, python=sys.executable)
                   for a in shlex.split(str(self.conf["vllm_command"]))]
            print(f"captions {self.label()}: {' '.join(map(shlex.quote, cmd))}")
            with tempfile.TemporaryFile() as log:
                p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
                if p.returncode != 0:
                    log.seek(0)
                    tail = log.read()[-800:].decode("utf-8", "replace")
                    raise PipelineError(f"vllm run-batch exited {p.returncode}: {tail}")
            Path(f"{dst}.part").replace(dst)
        answers = {}
        for line in dst.read_text(encoding="utf-8").splitlines():
            if line.strip():
                a = json.loads(line)
                answers.setdefault(a.get("custom_id"), a)
        return answers

    def _record(self, bkey: str, doc: dict | None) -> None:
        if doc is None:  # mapped back: the JSONL files of this job are no longer needed
            for suffix in ("input.jsonl", "output.jsonl"):
                (self.records_path.parent / "vllm-batch" / f"{bkey}.{suffix}").unlink(missing_ok=True)
