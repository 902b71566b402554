"""Open a report page in a real headless Chromium: a screenshot, and every console error.

    python -m camim.browser reports/captions.html shot.png

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands
on fd 3, replies on fd 4, each message JSON ending in NUL), so no driver package and no port are
needed.  What counts as an error: ``console.error``/``console.assert`` calls, uncaught
exceptions, and error entries of the browser log (a resource that failed to load, such as a
missing chart image).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    for n in NAMES:
        if shutil.which(n):
            return shutil.which(n)
    return None


class _Pipe:
    def __init__(self, proc, w, r):
        self.proc, self.w, self.r = proc, w, r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.read(end - time.monotonic())
            if m is None:
                break
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise PipelineError(f"chromium: {method}: {m['error'].get('message')}")
                return m.get("result", {})
            self.events.append(m)
        raise PipelineError(f"chromium: no answer to {method} within {timeout:.0f}s")

    def read(self, timeout: float) -> dict | None:
        import select

        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.r], [], [], max(0.0, timeout))
            if not ready:
                return None
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e.get("method") == method for e in self.events):
            return True
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self.read(end - time.monotonic())
            if m is None:
                return False
            self.events.append(m)
            if m.get("method") == method:
                return True
        return False


def check_page(html: Path, screenshot: Path, width: int = 1200, height: int = 900, timeout: float = 60.0) -> dict:
    """Load ``html`` in headless Chromium, write a PNG screenshot, and return
    ``{"errors": [...], "title": ..., "tables": n, "images": [(src, natural width)]}``."""
    exe = find_chromium()
    if exe is None:
        raise PipelineError("no Chromium found (apt-get install chromium)")
    html = Path(html).resolve()
    r_cmd, w_cmd = os.pipe()  # we write commands, Chromium reads them on fd 3
    r_out, w_out = os.pipe()  # Chromium writes replies on fd 4

    def child_fds():  # fd 3 and 4 in the child, whatever numbers the pipes have here
        a, b = os.dup(r_cmd), os.dup(w_out)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                             "--no-first-run", "--disable-extensions", f"--window-size={width},{height}", "about:blank"],
                            preexec_fn=child_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(r_cmd)
    os.close(w_out)
    cdp = _Pipe(proc, w_cmd, r_out)
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable", session=sid)
        cdp.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                 session=sid)
        cdp.send("Page.navigate", {"url": html.as_uri()}, session=sid)
        if not cdp.wait_for("Page.loadEventFired", timeout):
            raise PipelineError(f"chromium: {html} did not finish loading within {timeout:.0f}s")
        probe = ("JSON.stringify({title: document.title, tables: document.querySelectorAll('table').length, "
                 "images: Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])})")
        page = json.loads(cdp.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=sid)["result"]["value"])
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=sid)
        screenshot = Path(screenshot)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in cdp.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        return {"errors": errors, **page}
    finally:
        try:
            os.write(w_cmd, json.dumps({"id": 10**6, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(w_cmd)
        os.close(r_out)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m camim.browser <page.html> <screenshot.png>", file=sys.stderr)
        return 2
    out = check_page(Path(args[0]), Path(args[1]))
    print(f"{args[0]}: title {out['title']!r}, {out['tables']} table(s), images {out['images']}; screenshot {args[1]}")
    for e in out["errors"]:
        print(f"  error: {e}")
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
