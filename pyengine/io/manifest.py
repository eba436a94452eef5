"""Manifests: the size and SHA-256 of every file a directory was written with, so that a
reader detects a torn, truncated or corrupted file and can name it (model directories,
training checkpoints, a run's dense weights)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "CorruptFileError", "entry", "manifest_bytes",
           "parse_manifest", "verify", "read_manifest", "read_verified"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "pyengine.manifest/1"


class CorruptFileError(ValueError):
    """A file does not match the size or checksum it was written with (or cannot be parsed)."""


def entry(data: bytes) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of ``data``."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest_bytes(files: Mapping[str, bytes]) -> bytes:
    """The manifest of ``files`` (name -> contents) as JSON bytes."""
    doc = {"format": MANIFEST_FORMAT, "files": {n: entry(d) for n, d in sorted(files.items())}}
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse_manifest(data: bytes, where: str | Path) -> dict:
    """``{name: {"bytes", "sha256"}}`` from a manifest's bytes (``where`` names it in errors)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{where}: not valid JSON ({e}); the directory is damaged") \
            from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                       and isinstance(v.get("sha256"), str) for v in files.values())):
        raise CorruptFileError(f"{where}: not a {MANIFEST_FORMAT} manifest (expected "
                               "{\"format\": ..., \"files\": {name: {\"bytes\", \"sha256\"}}})")
    return files


def verify(where: str | Path, data: bytes, expected: dict | None) -> bytes:
    """``data`` (the contents of file ``where``) if it matches its manifest entry ``expected``
    (None: nothing to check); else a CorruptFileError naming the file."""
    if expected is not None:
        if len(data) != expected["bytes"]:
            raise CorruptFileError(f"{where} is damaged: {len(data)} bytes, but it was written "
                                   f"with {expected['bytes']} (truncated or overwritten)")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CorruptFileError(f"{where} is damaged: its SHA-256 does not match the one it "
                                   "was written with (corrupted bytes)")
    return data


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of ``directory``; None when it has none (written before manifests)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    return parse_manifest(path.read_bytes(), path)


def read_verified(path: str | Path, expected: dict | None) -> bytes:
    """The bytes of ``path``, checked against its manifest entry (unless ``expected`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return verify(path, path.read_bytes(), expected)
