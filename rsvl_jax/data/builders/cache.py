"""No stale cache: every build records what it was built from, and every open checks it.

A build's *source record* holds the builder name and version, the builder config's fields,
``on_error``, the annotation files it reads (name, size, sha256) and the image files under
``manual_dir`` (count and total bytes). Its hash names the build's folder:

    <data_dir>/<name>/src-<hash12>/<name>/<config>/<version>/     (TFDS's layout inside)

so a different source -- a caption edited, an image added, another config or ``on_error`` --
builds into a new folder (and the log says what differed from the previous build), and
pointing back at the old source reuses the old build. The record is also stored in
``info.metadata["source"]``.

Opening without ``manual_dir`` is fine when the dataset needs none (synthetic) or when
exactly one build with these settings exists; otherwise it is an error saying what to pass.
A ``manual_dir`` that does not exist is always an error, even if a build exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

from rsvl_jax.data.builders.common import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
_NOT_CONFIG = {"version", "release_notes", "supported_versions", "description", "tags"}


def resolve_config(cls, config):
    """The builder config object that ``cls(config=config)`` would use."""
    if config is None:
        return cls.BUILDER_CONFIGS[0] if cls.BUILDER_CONFIGS else None
    if isinstance(config, str):
        config = getattr(cls, "CONFIG_ALIASES", {}).get(config, config)
        known = {c.name: c for c in cls.BUILDER_CONFIGS}
        if config not in known:
            raise ValueError(f"{cls.name} has no config {config!r}; known: {sorted(known)}")
        return known[config]
    return config


def config_fields(config) -> dict:
    if config is None:
        return {}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in _NOT_CONFIG}


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_files(manual: pathlib.Path) -> tuple[int, int]:
    """(count, total bytes) of the image files anywhere under ``manual``."""
    count = size = 0
    for root, _, files in os.walk(manual):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                count += 1
                size += os.stat(os.path.join(root, name)).st_size
    return count, size


def source_record(cls, config, on_error: str, manual_dir=None) -> dict:
    """What a build of ``cls`` with ``config`` from ``manual_dir`` is made from (JSON-able)."""
    record = {"builder": cls.name, "version": str(cls.VERSION), "config": config_fields(config),
              "on_error": on_error}
    if manual_dir is not None:
        manual = pathlib.Path(manual_dir)
        files = cls.source_files(manual, config) if hasattr(cls, "source_files") else []
        record["files"] = [{"name": os.path.relpath(p, manual), "size": p.stat().st_size,
                            "sha256": _sha256(p)} for p in files]
        count, size = image_files(manual)
        record["images"] = {"count": count, "bytes": size}
    return record


def source_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def build_root(data_dir, name: str, record: dict) -> pathlib.Path:
    """The TFDS ``data_dir`` of the build made from ``record``."""
    return pathlib.Path(data_dir) / name / f"src-{source_hash(record)}"


def existing_builds(data_dir, name: str, config_name: str | None, version: str) -> list[pathlib.Path]:
    """Finished builds (TFDS ``data_dir`` roots) of ``name``/``config_name``, newest first."""
    base = pathlib.Path(data_dir) / name
    parts = [name] + ([config_name] if config_name else []) + [version, "dataset_info.json"]
    found = [p for p in base.glob("src-*") if p.joinpath(*parts).is_file()]
    return sorted(found, key=lambda p: p.joinpath(*parts).stat().st_mtime, reverse=True)


def read_record(root: pathlib.Path, name: str, config_name: str | None, version: str) -> dict | None:
    parts = [name] + ([config_name] if config_name else []) + [version, "metadata.json"]
    path = root.joinpath(*parts)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("source")


def difference(old: dict | None, new: dict) -> str:
    """One phrase naming the first thing that differs between two source records."""
    if old is None:
        return "the old build has no source record"
    for key in ("builder", "version", "config", "on_error"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} -> {new.get(key)!r}"
    old_files = {f["name"]: f for f in old.get("files", [])}
    new_files = {f["name"]: f for f in new.get("files", [])}
    for n in sorted(set(old_files) | set(new_files)):
        if n not in new_files:
            return f"{n} is gone"
        if n not in old_files:
            return f"{n} is new"
        if old_files[n] != new_files[n]:
            return (f"{n} changed (size {old_files[n]['size']} -> {new_files[n]['size']}, "
                    f"sha256 {old_files[n]['sha256'][:12]} -> {new_files[n]['sha256'][:12]})")
    if old.get("images") != new.get("images"):
        return f"image files {old.get('images')} -> {new.get('images')}"
    return "no difference"


def choose_root(cls, data_dir, config, on_error: str, manual_dir) -> tuple[pathlib.Path, dict | None]:
    """(TFDS data_dir to build or open, source record to store or None when reusing a build
    found without ``manual_dir``)."""
    config_name = config.name if config is not None else None
    version = str(cls.VERSION)
    needs_manual = bool(getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
    if manual_dir is not None:
        manual = pathlib.Path(manual_dir)
        if not manual.is_dir():
            raise DatasetError(f"manual_dir {manual} does not exist (or is not a folder); "
                               f"{cls.name} is read from it, built or not")
    if manual_dir is None and needs_manual:
        wanted = source_record(cls, config, on_error)
        matches = []
        for root in existing_builds(data_dir, cls.name, config_name, version):
            rec = read_record(root, cls.name, config_name, version) or {}
            if all(rec.get(k) == v for k, v in wanted.items()):
                matches.append((root, rec))
        label = f"{cls.name}/{config_name}" if config_name else cls.name
        if not matches:
            raise DatasetError(f"{label} (on_error={on_error}) is not built under {data_dir}: "
                               f"pass manual_dir (your {cls.name} folder) to build it")
        if len(matches) > 1:
            raise DatasetError(f"{len(matches)} builds of {label} from different sources are under "
                               f"{pathlib.Path(data_dir) / cls.name}; pass manual_dir to say which")
        return matches[0][0], None
    record = source_record(cls, config, on_error, manual_dir)
    root = build_root(data_dir, cls.name, record)
    done = root.joinpath(cls.name, *([config_name] if config_name else []), version, "dataset_info.json")
    if not done.is_file():
        previous = [r for r in existing_builds(data_dir, cls.name, config_name, version) if r != root]
        if previous and manual_dir is not None:
            old = read_record(previous[0], cls.name, config_name, version)
            if old and old.get("config") == record["config"]:
                log.warning("%s: the source differs from the build in %s (%s); building a new one "
                            "in %s", cls.name, previous[0], difference(old, record), root)
    if manual_dir is not None:  # for the reader's information; not part of the hash
        record = dict(record, manual_dir=os.fspath(pathlib.Path(manual_dir).resolve()))
    return root, record
