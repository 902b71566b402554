"""The content-addressed cache store.

Layout under the store root (``cache/`` by default)::

    <stage>/<key>/spec.json                 what produced this key (written once)
    <stage>/<key>/parts/part-<seq>-<id>.safetensors   tensors of one batch (optional)
    <stage>/<key>/parts/part-<seq>-<id>.parquet       rows of one batch; written LAST
    <stage>/<key>/done/<inputs>.json        done-marker for one input set, written last
    <stage>/<key>/files/...                 whole-table outputs of non-itemised stages
    <stage>/<key>/checked/part-*.json       stamp: the tensor file's size/mtime/inode when its sha256 last matched

A part is committed when its Parquet file exists: tensors are written first, the
Parquet index second, each to a temporary name and then ``os.replace``-d into place.
Every index row records the sha256 of its part's tensor file (``tensor_sha256``).
Readers verify a part whenever its tensor file disagrees with its stamp (so unchanged parts are
not re-hashed by every process; ``cache verify`` re-hashes all): a part whose Parquet cannot be read, whose
tensor file is missing, or whose checksum differs is moved to ``<key>/quarantine/``
with the reason, the user is told, and its items are simply absent, so the next run
of the stage recomputes them.  A tensor with NaN or Inf is never committed: its item
is recorded as failed, naming the tensor.
A run killed at any instant therefore leaves either a complete part or an orphan
temporary/tensor file that readers ignore and ``gc`` removes.  Items are keyed by
content (``item_key``); a resumed run skips every item already present in a part.

Tensors of a part are stored per name either *stacked* (``name``: ``[n, ...]``) or
*ragged* (``name``: ``[sum_i len_i, ...]`` plus ``name.offsets``: ``[n + 1]``).
No pickle anywhere: Parquet for tables, safetensors for tensors.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PipelineError
from .hashing import canonical_json, sha256_file

log = logging.getLogger("camim")
#: key folders whose lock this process holds
_HELD: set[str] = set()


def _tell(msg: str) -> None:
    """One line for the user on stderr (printed, not logged: the CLI's logging writes to stderr
    too, and the line would come twice)."""
    log.debug(msg)
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def folder_lock(folder: Path, what: str, waiting: str):
    """Hold ``<folder>/.lock`` (an exclusive ``flock``, released by the kernel when the holder dies,
    even by SIGKILL).  A second holder tells the user ``"<what>: <pid on host> <waiting>"`` and waits.
    Re-entrant within a process.  Used by the store's keys and by trained runs."""
    import fcntl
    import socket

    if str(folder) in _HELD:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+")
    except OSError as exc:
        raise _write_failed(folder / ".lock", exc) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            _tell(f"{what}: {who} {waiting}")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        _HELD.add(str(folder))
        yield
    finally:
        _HELD.discard(str(folder))
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class WriteError(PipelineError):
    """A write failed (disk full, read-only, permissions): what is committed stays intact."""


def _write_failed(path: Path, exc: BaseException, tmp: Path | None = None) -> WriteError:
    if tmp is not None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return WriteError(f"cannot write {path}: {why} (everything committed before is intact; {_mend(exc)} and run again to resume)")


def _mend(exc: BaseException) -> str:
    """What to do about a failed write, from its errno."""
    import errno

    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable"
    if code in (errno.EEXIST, errno.ENOTDIR):
        return "a file stands where a folder is needed on that path: move it"
    return "fix the cause"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc, tmp) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        raise _write_failed(path, exc, tmp) from None


def non_finite(results: list["ItemResult"]) -> None:
    """Turn an item whose float tensor holds NaN/Inf into a recorded failure naming the tensor."""
    import torch

    for r in results:
        if r.error is not None:
            continue
        for name, t in r.tensors.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                r.error = f"NonFinite: tensor {name!r} of item {r.item_key} holds NaN or Inf; not cached"
                r.tensors = {}
                break


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class ItemResult:
    """What a stage returns for one item of a batch.

    ``row`` holds scalars/lists for the Parquet index; ``tensors`` holds arrays
    (torch tensors) for the safetensors part.  ``error`` set means the item failed
    permanently (it is recorded, with its reason, and the run goes on).
    """

    item_key: str
    row: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class StageCache:
    """One ``<stage>/<key>`` folder: parts, an index over them, done-markers."""

    def __init__(self, root: Path, stage: str, key: str):
        self.root = Path(root)
        self.stage = stage
        self.key = key
        self.dir = self.root / stage / key
        self.parts_dir = self.dir / "parts"
        self.files_dir = self.dir / "files"
        self._index: pa.Table | None = None

    # -- one run at a time per key -----------------------------------------
    @contextmanager
    def lock(self):
        """Hold the key's lock (``<key>/.lock``, an exclusive ``flock``) while a run plans and
        writes.  A second run on the same key waits, then finds the first one's items
        committed and computes only what is left: two runs never compute an item twice.
        ``flock`` is honoured across hosts on NFSv4 and most cluster file systems, so Ray
        drivers on shared storage exclude each other too.  Re-entrant within a process."""
        with folder_lock(self.dir, f"{self.stage}/{self.key}", "is running this stage; waiting for it, then computing only what it left"):
            yield

    # -- spec and markers -------------------------------------------------
    def write_spec(self, spec: dict) -> None:
        path = self.dir / "spec.json"
        if path.exists():
            old = json.loads(path.read_text())
            if canonical_json(old.get("key_config")) != canonical_json(spec.get("key_config")):
                raise PipelineError(f"cache key collision in {path}: same key, different config")
            return
        atomic_write_json(path, spec)

    def spec(self) -> dict:
        path = self.dir / "spec.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_done(self, inputs_key: str, summary: dict) -> None:
        atomic_write_json(self.dir / "done" / f"{inputs_key}.json", summary)

    def is_done(self, inputs_key: str) -> bool:
        return (self.dir / "done" / f"{inputs_key}.json").exists()

    def done_markers(self) -> list[Path]:
        d = self.dir / "done"
        return sorted(d.glob("*.json")) if d.exists() else []

    # -- parts --------------------------------------------------------------
    def part_paths(self) -> list[Path]:
        """Committed parts (those whose Parquet index exists), in write order."""
        if not self.parts_dir.exists():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet"))

    def write_part(self, results: list[ItemResult], ragged: Iterable[str] = ()) -> Path | None:
        """Write one batch as a committed part. Returns the Parquet path."""
        if not results:
            return None
        import torch  # tensors are torch throughout; safetensors.torch keeps bf16
        from safetensors.torch import save_file

        ragged = set(ragged)
        non_finite(results)
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_failed(self.parts_dir, exc) from None
        seq = len(self.part_paths())
        stem = f"part-{seq:06d}-{secrets.token_hex(3)}"
        ok = [r for r in results if r.error is None]
        names = sorted({n for r in ok for n in r.tensors})
        tensors: dict[str, Any] = {}
        for name in names:
            vals = [r.tensors[name] for r in ok]
            if len(vals) != len(ok):
                raise PipelineError(f"stage {self.stage}: tensor {name!r} missing for some items")
            if name in ragged:
                lens = [int(v.shape[0]) for v in vals]
                offsets = torch.zeros(len(vals) + 1, dtype=torch.int64)
                offsets[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0)
                tensors[name] = torch.cat([v.contiguous() for v in vals], 0).contiguous()
                tensors[f"{name}.offsets"] = offsets
            else:
                tensors[name] = torch.stack([v.contiguous() for v in vals], 0).contiguous()
        digest = None
        if tensors:
            tmp = self.parts_dir / f".{stem}.safetensors.tmp-{secrets.token_hex(4)}"
            final = self.parts_dir / f"{stem}.safetensors"
            try:
                save_file(tensors, str(tmp))
                digest = sha256_file(tmp)
                os.replace(tmp, final)
            except Exception as exc:  # noqa: BLE001 - safetensors wraps ENOSPC in its own error type
                if isinstance(exc, OSError) or "No space" in str(exc) or "os error" in str(exc).lower():
                    raise _write_failed(final, exc, tmp) from None
                raise
            self._stamp(final, digest)
        rows: dict[str, list] = {"item_key": [], "ok": [], "error": [], "tensor_row": [], "tensor_sha256": []}
        row_names = sorted({n for r in results for n in r.row})
        for n in row_names:
            rows[n] = []
        t_row = 0
        for r in results:
            rows["item_key"].append(r.item_key)
            rows["ok"].append(r.error is None)
            rows["error"].append(r.error)
            rows["tensor_row"].append(t_row if r.error is None else -1)
            rows["tensor_sha256"].append(digest)
            if r.error is None:
                t_row += 1
            for n in row_names:
                rows[n].append(r.row.get(n))
        path = self.parts_dir / f"{stem}.parquet"
        atomic_write_table(path, pa.table(rows))
        self._index = None
        return path

    def index(self) -> pa.Table:
        """All committed rows, one per item_key (its first successful row, else its
        latest row: a failure retried later is superseded), with their part."""
        if self._index is not None:
            return self._index
        tables = []
        for path in self.part_paths():
            t, why = self.check_part(path)
            if why:
                self.quarantine(path, why)
                continue
            t = t.append_column("part", pa.array([path.stem] * t.num_rows, pa.string()))
            tables.append(t)
        if not tables:
            self._index = pa.table({"item_key": pa.array([], pa.string()), "ok": pa.array([], pa.bool_())})
            return self._index
        table = pa.concat_tables(tables, promote_options="default")
        keys = table.column("item_key").to_pylist()
        oks = table.column("ok").to_pylist()
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            j = first.get(k)
            if j is None or not oks[j]:  # a failure is superseded by any later row
                first[k] = i
        if len(first) != len(keys):
            table = table.take(pa.array(sorted(first.values()), pa.int64()))
        self._index = table
        return table

    def check_part(self, path: Path, force: bool = False) -> tuple[pa.Table | None, str | None]:
        """Read one part's index and verify its tensor file (unless its stamp shows it unchanged since its
        checksum last matched; ``force`` re-hashes anyway).  Returns the table, or why the part is damaged."""
        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            return None, f"its Parquet index cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        # a part written with tensors records their checksum (parts from before checksums: nothing to verify)
        sums = [x for x in t.column("tensor_sha256").to_pylist() if x] if "tensor_sha256" in t.column_names else []
        if not sums:
            return t, None
        tpath = path.with_suffix(".safetensors")
        if not tpath.exists():
            return None, f"its tensor file {tpath.name} is missing"
        if not force and self._stamped(tpath, sums[0]):
            return t, None
        digest = sha256_file(tpath)
        if digest != sums[0]:
            return None, f"its tensor file {tpath.name} does not match the checksum recorded at write time"
        self._stamp(tpath, digest)
        return t, None

    # A part's stamp records its tensor file's size, mtime and inode when its checksum last matched, so
    # a process re-hashes only parts that changed since (as git's index and DVC's state do).  A stamp
    # written in the same clock tick as the file's mtime is not trusted (a later write in that tick
    # would keep the mtime); ``camim cache verify`` re-hashes every part whatever its stamp says.
    def _stamp_path(self, tpath: Path) -> Path:
        return self.dir / "checked" / f"{tpath.stem}.json"

    def _stamp(self, tpath: Path, digest: str) -> None:
        st = tpath.stat()
        try:
            atomic_write_json(self._stamp_path(tpath), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": digest})
        except WriteError:  # a read-only cache is still readable: it is just verified again next time
            pass

    def _stamped(self, tpath: Path, digest: str) -> bool:
        sp = self._stamp_path(tpath)
        try:
            st, stamp_mtime, rec = tpath.stat(), sp.stat().st_mtime_ns, json.loads(sp.read_bytes())
        except (OSError, ValueError):
            return False
        return (rec.get("sha256") == digest and rec.get("size") == st.st_size and rec.get("ino") == st.st_ino
                and rec.get("mtime_ns") == st.st_mtime_ns and st.st_mtime_ns < stamp_mtime)

    def quarantine(self, path: Path, why: str) -> Path:
        """Move a damaged part (index and tensors) out of the way; its items get recomputed."""
        qdir = self.dir / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        for p in (path, path.with_suffix(".safetensors")):
            if p.exists():
                os.replace(p, qdir / p.name)
        self._stamp_path(path).unlink(missing_ok=True)
        atomic_write_json(qdir / f"{path.stem}.why.json", {"part": path.stem, "why": why})
        msg = (f"cache: damaged part {path}: {why}; moved to {qdir}, its items will be recomputed by the next run "
               f"of the {self.stage} stage")
        _tell(msg)
        self._index = None
        return qdir

    def quarantined(self) -> list[dict]:
        qdir = self.dir / "quarantine"
        if not qdir.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(qdir.glob("*.why.json"))]

    def done_keys(self, include_failed: bool = True) -> set[str]:
        idx = self.index()
        if idx.num_rows == 0:
            return set()
        if include_failed:
            return set(idx.column("item_key").to_pylist())
        ok = idx.column("ok").to_pylist()
        return {k for k, o in zip(idx.column("item_key").to_pylist(), ok) if o}

    def rows(self, keys: list[str] | None = None) -> list[dict]:
        """Index rows as dicts, optionally in the order of ``keys`` (missing → None)."""
        idx = self.index().to_pylist()
        if keys is None:
            return idx
        by_key = {r["item_key"]: r for r in idx}
        return [by_key.get(k) for k in keys]

    def _by_part(self, keys: list[str | None]) -> dict[str, list[tuple[int, int]]]:
        """``{part: [(position in keys, tensor row)]}`` for ``keys`` (None: skipped); each must be present and ok."""
        by_key = {r["item_key"]: r for r in self.index().to_pylist()}
        wanted: dict[str, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            if k is None:
                continue
            r = by_key.get(k)
            if r is None or not r["ok"]:
                raise PipelineError(f"{self.stage}/{self.key}: item {k} is not in the cache")
            wanted.setdefault(r["part"], []).append((i, r["tensor_row"]))
        return wanted

    def _open_part(self, part: str):
        from safetensors import safe_open

        path = self.parts_dir / f"{part}.safetensors"
        try:
            return path, safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
            raise PipelineError(f"{path}: cannot read the cached tensors ({exc}); run `camim cache verify`, "
                                f"then the same command again to recompute them") from None

    def tensors(self, keys: list[str], names: list[str]) -> dict[str, list]:
        """Gather tensors for ``keys`` (all must be present and ok), memory-mapped.

        Returns ``{name: [tensor_i for i in keys]}``; ragged names give per-item slices.
        """
        out: dict[str, list] = {n: [None] * len(keys) for n in names}
        for part, pairs in self._by_part(keys).items():
            path, f_ctx = self._open_part(part)
            with f_ctx as f:
                available = set(f.keys())
                for n in names:
                    if f"{n}.offsets" in available:
                        offs = f.get_tensor(f"{n}.offsets")
                        sl = f.get_slice(n)
                        for i, row in pairs:
                            out[n][i] = sl[int(offs[row]) : int(offs[row + 1])]
                    elif n in available:
                        full = f.get_tensor(n)
                        for i, row in pairs:
                            out[n][i] = full[row]
                    else:
                        raise PipelineError(f"{path}: no tensor {n!r}")
        return out

    def ragged(self, keys: list[str | None], name: str, dim: int | None = None, dtype=None):
        """The ragged tensor ``name`` of ``keys`` (None: an empty row) as one flat ``[P, dim]`` tensor
        and its ``[len(keys) + 1]`` offsets: row i is ``flat[off[i]:off[i + 1]]``.  Read part by part
        straight into place, so the rows are never held twice (a list of per-item tensors, then their
        concatenation, took twice the memory at the peak).  ``dim`` and ``dtype``: None takes the
        parts' own (with no key at all: float32, and ``dim`` must be given)."""
        import torch

        wanted = self._by_part(keys)
        lens = torch.zeros(len(keys), dtype=torch.int64)
        part_offs: dict[str, torch.Tensor] = {}
        for part, pairs in wanted.items():
            path, f_ctx = self._open_part(part)
            with f_ctx as f:
                if f"{name}.offsets" not in set(f.keys()):
                    raise PipelineError(f"{path}: no ragged tensor {name!r}")
                offs = part_offs[part] = f.get_tensor(f"{name}.offsets")
                if dtype is None or dim is None:
                    none = f.get_slice(name)[0:0]  # no rows: the parts' dtype and width
                    dtype = none.dtype if dtype is None else dtype
                    dim = int(none.shape[-1]) if dim is None else dim
            rows = torch.tensor([row for _, row in pairs], dtype=torch.int64)
            lens[torch.tensor([i for i, _ in pairs], dtype=torch.int64)] = offs[rows + 1] - offs[rows]
        off = torch.zeros(len(keys) + 1, dtype=torch.int64)
        off[1:] = lens.cumsum(0)
        if dim is None:
            raise PipelineError(f"{self.stage}/{self.key}: no item to read {name!r} from, and no width given")
        flat = torch.empty(int(off[-1]), dim, dtype=dtype or torch.float32)
        for part, pairs in wanted.items():
            path, f_ctx = self._open_part(part)
            with f_ctx as f:
                full, offs = f.get_tensor(name), part_offs[part]
                if full.shape[-1] != dim:
                    raise PipelineError(f"{path}: tensor {name!r} has width {full.shape[-1]}, expected {dim}")
                for i, row in pairs:
                    flat[int(off[i]) : int(off[i + 1])] = full[int(offs[row]) : int(offs[row + 1])]
        return flat, off

    def orphans(self) -> list[Path]:
        """Temporary files, tensor files without a committed index, stamps of parts gone, and quarantined parts."""
        if not self.parts_dir.exists():
            return []
        committed = {p.stem for p in self.part_paths()}
        out = [p for p in self.parts_dir.iterdir() if p.name.startswith(".")]
        out += [p for p in self.parts_dir.glob("part-*.safetensors") if p.stem not in committed]
        sdir = self.dir / "checked"
        out += sorted(p for p in sdir.glob("*.json") if p.stem not in committed) if sdir.exists() else []
        qdir = self.dir / "quarantine"  # damaged parts, already replaced by recomputed ones
        out += sorted(qdir.iterdir()) if qdir.exists() else []
        return out


class Store:
    """The cache root; hands out :class:`StageCache` folders and lists them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage(self, stage: str, key: str) -> StageCache:
        return StageCache(self.root, stage, key)

    def entries(self) -> list[StageCache]:
        out = []
        if not self.root.exists():
            return out
        for sdir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for kdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                out.append(StageCache(self.root, sdir.name, kdir.name))
        return out

    def describe(self) -> list[dict]:
        rows = []
        for sc in self.entries():
            spec = sc.spec()
            n_rows = sc.index().num_rows if sc.part_paths() else spec.get("rows", 0)
            rows.append(
                {
                    "stage": sc.stage,
                    "key": sc.key,
                    "what": spec.get("label", ""),
                    "rows": n_rows,
                    "parts": len(sc.part_paths()),
                    "bytes": dir_size(sc.dir),
                    "done": len(sc.done_markers()),
                }
            )
        return rows

    def remove(self, sc: StageCache) -> int:
        size = dir_size(sc.dir)
        shutil.rmtree(sc.dir)
        return size

