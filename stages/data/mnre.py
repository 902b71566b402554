"""MNRE (v2) as used by HVPNeT, TMR and CAMIM.

A source is a folder holding ``mnre_{train,val,test}.txt`` (or CAMIM's
``ours_{split}.txt``), ``ours_rel2id.json`` and, optionally, ``camim_captions/``
with ``<source>_{split}.txt``.  Without ``--source``/``MNRE_SOURCE`` the small real
sample bundled in ``data/sample/mnre`` is used.  ``--source download`` fetches the
public files, checking each one's sha256.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import Settings, asset_dir
from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file
from pipeline.store import atomic_write_bytes

from .readers import ReadResult, read_mnre, read_rel2id

log = logging.getLogger("camim")

SPLITS = ("train", "val", "test")
SAMPLE = asset_dir("sample") / "mnre"

_MNRE = "https://raw.githubusercontent.com/thecharm/MNRE/main/mnre_txt/"
_CAMIM = "https://raw.githubusercontent.com/zefanZhang-cn/CAMIM/main/CAMIM/data/"
# file name here -> (url, sha256). The hashes are those of the public files.
DOWNLOADS = {
    "mnre_train.txt": (_MNRE + "mnre_train.txt", "1cc34438a00e2a2db73e4eba297820f926f62abd1fddc693caa13c58b62428b7"),
    "mnre_val.txt": (_MNRE + "mnre_val%20.txt", "c76865179b5678167b164c21fd25ed31f9a1416da393ac93ce70f32b00352b75"),
    "mnre_test.txt": (_MNRE + "mnre_test.txt", "f53c2f9b7739bea7d08aee4a91bfd6ec7432e1d0eeb83debf10f5d3291bc5215"),
    "ours_rel2id.json": (_CAMIM + "ours_rel2id.json", "f09c6c2773fd9078e1b46dd632cba2e0d4b0448d9695d00297e72d4e1f50fd15"),
    "camim_captions/qwen_train.txt": (_CAMIM + "caption/caption_train.txt", "e0c46e6fdb3e179fd3db6d645c211a277e3d217b872f59162413783a9b489fe2"),
    "camim_captions/qwen_val.txt": (_CAMIM + "caption/caption_val.txt", "cba87fc4ad456e41eee395e8315f23ccf1e7eecddc0c296db7f8cfa2218c8abb"),
    "camim_captions/qwen_test.txt": (_CAMIM + "caption/caption_test.txt", "f32aaebc140dc5a77ff7ab6cf75afa38a53587901c5b19d61920540db4e17a17"),
    "camim_captions/minicpm_train.txt": (_CAMIM + "caption/minicpm_train.txt", "d8eeb2f6718b47519650352a8b333b081d9d975e82c869f32f5e1e6051ce3d65"),
    "camim_captions/minicpm_val.txt": (_CAMIM + "caption/minicpm_val.txt", "e0d873e4ab65b2c9e62a8b64edc48cb145392826d6c216bebfbb8d9e9d124c6b"),
    "camim_captions/minicpm_test.txt": (_CAMIM + "caption/minicpm_test.txt", "9e48e36e63f786018eac2b225f59335cafc2a2186f63a68f0b9df5770b83bbe3"),
    "camim_captions/blip2_train.txt": (_CAMIM + "caption/BLIP_train.txt", "206c180afb9d4cfc830c204343c5d4a42b0ff434cc19250323bf1ae3e7aa366f"),
    "camim_captions/blip2_val.txt": (_CAMIM + "caption/BLIP_val.txt", "d19339d77be30dcd9103a6153ea0cdf17256d2db47c7d77495b311d6a6aaf5bc"),
    "camim_captions/blip2_test.txt": (_CAMIM + "caption/BLIP_test.txt", "7eaa35a2a435b5d39089ae1711e8923bfa13081816dbef54d7d0f363c3bd7813"),
    "camim_captions/instructblip_train.txt": (_CAMIM + "caption/instruct_train.txt", "a1b59c04606bbdbfbabe749fb2b92950fa114e2a9decd55aa263cba4fd3b2275"),
    "camim_captions/instructblip_val.txt": (_CAMIM + "caption/instruct_val.txt", "faeaa5aea6483576152d363c076a4ebfd737895347f5afc837299cc6f2289ffc"),
    "camim_captions/instructblip_test.txt": (_CAMIM + "caption/instruct_test.txt", "5e64950598063c0bea50385a6a9785219869d8c26d71db29766deca205111a30"),
}


def download(dest: Path, timeout: float = 30.0) -> Path:
    """Fetch the public MNRE text and CAMIM captions into ``dest``, checking sha256."""
    for name, (url, digest) in DOWNLOADS.items():
        path = dest / name
        if path.exists() and (not digest or sha256_file(path) == digest):
            continue
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - fixed https URLs
                data = resp.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise PipelineError(
                f"could not download {url} ({exc}); the network may be closed: "
                "set MNRE_SOURCE to a local folder with the MNRE files instead"
            ) from None
        atomic_write_bytes(path, data)
        if digest and sha256_file(path) != digest:
            path.unlink()
            raise PipelineError(f"{url}: sha256 mismatch (expected {digest}); the upstream file changed")
    return dest


class MnreTask:
    name = "mnre"
    version = "1"
    kind = "re"

    def __init__(self, arg: str = ""):
        self.arg = arg

    def source_dir(self, settings: Settings) -> Path:
        src = settings.source or ""  # MNRE_SOURCE reaches settings.source through the CLI
        if not src:
            return SAMPLE
        if src == "download":
            return download(Path(settings.cache_dir) / "downloads" / "mnre")
        path = Path(src)
        if not path.is_dir():
            raise PipelineError(f"MNRE source {path} is not a folder")
        return path

    def source_files(self, settings: Settings) -> dict[str, Path]:
        root = self.source_dir(settings)
        files: dict[str, Path] = {}
        for split in SPLITS:
            cands = [root / f"mnre_{split}.txt", root / f"ours_{split}.txt", root / f"mnre_{split} .txt"]
            found = next((c for c in cands if c.is_file()), None)
            if found is None:
                raise PipelineError(f"{root}: no mnre_{split}.txt (or ours_{split}.txt)")
            files[split] = found
        rel = root / "ours_rel2id.json"
        if not rel.is_file():
            raise PipelineError(f"{root}: no ours_rel2id.json")
        files["rel2id"] = rel
        return files

    def read(self, files: dict[str, Path], settings: Settings) -> ReadResult:
        rel2id = read_rel2id(files["rel2id"])
        out = ReadResult()
        for split in SPLITS:
            res = read_mnre(files[split], split, rel2id, settings.on_error)
            out.rows.extend(res.rows)
            out.skipped.extend(res.skipped)
        return out

    def labels(self, settings: Settings) -> list[str]:
        rel2id = read_rel2id(self.source_files(settings)["rel2id"])
        return [k for k, _ in sorted(rel2id.items(), key=lambda kv: kv[1])]

    def caption_files(self, settings: Settings, name: str) -> list[Path]:
        """Files of the imported caption source ``name`` (a shipped name, a file or a folder)."""
        root = self.source_dir(settings)
        direct = Path(name)
        if direct.is_file():
            return [direct]
        if direct.is_dir():
            files = sorted(p for p in direct.iterdir() if p.suffix in (".txt", ".json"))
            if not files:
                raise PipelineError(f"caption folder {direct} has no .txt or .json files")
            return files
        files = [root / "camim_captions" / f"{name}_{split}.txt" for split in SPLITS]
        files = [f for f in files if f.is_file()]
        if not files:
            known = sorted({p.name.rsplit("_", 1)[0] for p in (root / "camim_captions").glob("*_*.txt")})
            raise PipelineError(
                f"no imported captions named {name!r} in {root / 'camim_captions'} "
                f"(shipped: {', '.join(known) or 'none'}; or give a file or folder path)"
            )
        return files

    def caption_sources(self, settings: Settings) -> list[str]:
        d = self.source_dir(settings) / "camim_captions"
        return sorted({p.name.rsplit("_", 1)[0] for p in d.glob("*_*.txt")}) if d.is_dir() else []
