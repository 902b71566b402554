"""Settings: a profile (TOML under pipeline/profiles or a user path) plus CLI/env overrides."""

from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
_PACKAGED = Path(__file__).resolve().parent / "_assets"  # what a wheel carries (setup.py copies it in)
_IN_CHECKOUT = {"prompts": REPO_ROOT / "prompts", "sample": REPO_ROOT / "data" / "sample"}


def asset_dir(name: str) -> Path:
    """``prompts`` or ``sample``: the checkout's folder, or the copy an installed wheel carries."""
    here = _IN_CHECKOUT[name]
    return here if here.is_dir() else _PACKAGED / name


def home() -> Path:
    """Where cache/, runs/ and reports/ go by default: ``CAMIM_HOME``, else the current folder
    (never the installed package)."""
    return Path(os.environ.get("CAMIM_HOME") or os.getcwd())


def load_profile(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A profile; ``extends = "<profile name or path>"`` merges it over its parent, so a profile
    holds only its differences."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
        raise PipelineError(f"unknown profile {name_or_path!r} (known: {known}; or give a .toml path)")
    try:
        conf = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    parent = conf.pop("extends", None)
    if parent is None:
        return conf
    if str(path.resolve()) in _seen:
        raise PipelineError(f"{path}: profiles extend each other in a circle ({' -> '.join(_seen)})")
    if not Path(parent).suffix:  # a name: a packaged profile; a relative path: next to this one
        base = parent
    else:
        base = str(Path(parent) if Path(parent).is_absolute() else path.parent / parent)
    return extend(load_profile(base, (*_seen, str(path.resolve()))), conf)


def extend(parent: dict, child: dict) -> dict:
    """A profile over its parent: ``merge``, except that a setting the child gives in a plain
    section also beats the parent's task blocks (``[tasks.<task>.<section>]``) for it, so the
    more specific profile always wins; within one profile the task block wins."""
    parent = copy.deepcopy(parent)
    for blocks in (parent.get("tasks") or {}).values():
        for sec, vals in child.items():
            if sec != "tasks" and isinstance(vals, dict) and isinstance(blocks.get(sec), dict):
                for k in vals:
                    blocks[sec].pop(k, None)
    return merge(parent, child)


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_path(names: tuple[str, ...], default: Path) -> Path:
    """The first of the environment variables ``names`` that is set, else ``default``."""
    for n in names:
        if os.environ.get(n):
            return Path(os.environ[n])
    return default


def default_cache_dir() -> Path:
    return _env_path(("CACHE_DIR",), home() / "cache")


def default_runs_dir() -> Path:
    # CAMIM_RUNS_DIR / CAMIM_REPORTS_DIR: older names, still read
    return _env_path(("RUNS_DIR", "CAMIM_RUNS_DIR"), home() / "runs")


def default_reports_dir() -> Path:
    return _env_path(("REPORTS_DIR", "CAMIM_REPORTS_DIR"), home() / "reports")


@dataclass
class Settings:
    profile: str = "offline"
    cache_dir: Path = field(default_factory=default_cache_dir)
    task: str = "mnre"
    source: str | None = None
    mllm: str = "imported:qwen"
    prompt: str = "camim"
    run: str | None = None
    on_error: str = "stop"
    batch_size: int | None = None
    device: str = "auto"
    image_dir: str | None = None
    engine: str = "local"
    workers: int | None = None
    conf: dict = field(default_factory=dict)
    runs_dir: Path = field(default_factory=default_runs_dir)
    reports_dir: Path = field(default_factory=default_reports_dir)
    # run-time choices of the grounding stage; each beats the profile's [ground] value when set
    ground: str | None = None
    crop_dir: str | None = None
    trans_dir: str | None = None
    crop_index: str | None = None

    def __post_init__(self):
        self.cache_dir = Path(self.cache_dir)
        self.runs_dir = Path(self.runs_dir)
        self.reports_dir = Path(self.reports_dir)
        if self.run and ("/" in self.run or "\\" in self.run or self.run in (".", "..")):
            raise PipelineError(f"--run {self.run!r} is a run id, not a path: name the folder with --runs-dir "
                                f"(RUNS_DIR) and the run inside it with --run")
        if self.on_error not in ("stop", "skip"):
            raise PipelineError(f"--on-error must be stop or skip, not {self.on_error!r}")
        from .executors import ENGINES

        if self.engine not in ENGINES:
            raise PipelineError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        self._executor = None
        if not self.conf:
            self.conf = load_profile(self.profile)

    @property
    def executor(self):
        """The executor every stage of this command runs on, chosen once from ``engine``/``workers``."""
        if self._executor is None:
            from .executors import make_executor

            self._executor = make_executor(self.engine, self.workers)
        return self._executor

    def ground_overrides(self) -> dict:
        """``[ground]`` values chosen at run time (``--ground``, ``--crop-dir``, ``--trans-dir``, ``--crop-index``)."""
        given = {"backend": self.ground, "crop_dir": self.crop_dir, "trans_dir": self.trans_dir, "crop_index": self.crop_index}
        return {k: v for k, v in given.items() if v}

    @property
    def mllms(self) -> list[str]:
        return [m.strip() for m in self.mllm.split(",") if m.strip()]

    def section(self, name: str) -> dict:
        """The profile's ``[name]`` with the running task's ``[tasks.<task>.<name>]`` merged over it
        (a profile can give one task its own text cut, head or epochs)."""
        base = dict(self.conf.get(name, {}))
        over = ((self.conf.get("tasks") or {}).get(self.task) or {}).get(name)
        return merge(base, over) if over else base
