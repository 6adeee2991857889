"""Where a config's stores are: the one rule the gateway, its workers, `fieldgate store` and
the load test share.

A single gateway keeps its store at ``store.path``, or ``state_dir/store.db`` when that is not
set. Worker I of ``fieldgate run --workers W`` has the state folder ``state_dir/worker-I`` and
the store ``<stem>-worker-I<suffix>`` beside ``store.path``, or ``state_dir/worker-I/store.db``.
A worker's paths do not depend on W, so a run of another layout finds what an earlier one left.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Config

STORE_FILE = "store.db"


def store_path(cfg: Config) -> Path:
    """The store file of the gateway ``cfg`` configures (a worker's share included)."""
    return cfg.store.path or cfg.gateway.state_dir / STORE_FILE


def worker_state_dir(cfg: Config, index: int) -> Path:
    return cfg.gateway.state_dir / f"worker-{index}"


def worker_store_setting(cfg: Config, index: int) -> Path | None:
    """Worker ``index``'s ``store.path``: None when the store lives in its state folder."""
    path = cfg.store.path
    if path is None:
        return None
    return path.with_name(f"{path.stem}-worker-{index}{path.suffix}")


def worker_store_path(cfg: Config, index: int) -> Path:
    """The store file of worker ``index`` (whatever the worker count)."""
    return worker_store_setting(cfg, index) or worker_state_dir(cfg, index) / STORE_FILE


def run_stores(cfg: Config, workers: int) -> list[Path]:
    """The store files a run of ``workers`` processes keeps (1: a single gateway)."""
    if workers > 1:
        return [worker_store_path(cfg, i) for i in range(workers)]
    return [store_path(cfg)]


def worker_indices(cfg: Config) -> set[int]:
    """Workers that have left a state folder or a store file behind."""
    found = set()
    for child in cfg.gateway.state_dir.glob("worker-*"):
        if (m := re.fullmatch(r"worker-(\d+)", child.name)) and child.is_dir():
            found.add(int(m.group(1)))
    if cfg.store.path is not None:
        stem, suffix = cfg.store.path.stem, cfg.store.path.suffix
        for child in cfg.store.path.parent.glob(f"{stem}-worker-*{suffix}"):
            if m := re.fullmatch(rf"{re.escape(stem)}-worker-(\d+){re.escape(suffix)}", child.name):
                found.add(int(m.group(1)))
    return found


def stores_left(cfg: Config) -> list[Path]:
    """Every store file a gateway of ``cfg`` may have left, single first, then the workers'
    in worker order; only those that exist, or the single store's path when none does."""
    single = store_path(cfg)
    workers = [worker_store_path(cfg, i) for i in sorted(worker_indices(cfg))]
    found = [p for p in [single, *workers] if p.exists()]
    return found or [single]
