"""Checkpoints shipped inside the package, each a Qwen2.5-VL-format directory with a MANIFEST.json.

PERCEIVE_TINY: the tiny model pretrained on dense perception (`configs/perceive_synthetic.py`,
1.3M parameters, 5 MB in float32), the synthetic recipe's starting point that can see. Shipped
rather than built by the recipe: its 8000 steps take ~30 min on a 2-core CPU, twice the whole
main job's budget, and a user of the real recipe starts from a released checkpoint too.

The manifest records each file's sha256, the command that made the directory and its held-out
perception check (`jobs/perceive.py`); `verify` checks the files against it.
"""

from __future__ import annotations

import hashlib
import json
import os

PERCEIVE_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perceive_tiny")
MANIFEST = "MANIFEST.json"


class ManifestError(ValueError):
    """A shipped checkpoint whose files differ from its manifest; the message names the file."""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str, **fields) -> dict:
    """Writes DIRECTORY/MANIFEST.json: the sha256 of every other file plus `fields` (e.g. the
    command and the check's figures); returns it."""
    files = sorted(f for f in os.listdir(directory) if f != MANIFEST and os.path.isfile(os.path.join(directory, f)))
    manifest = {**fields, "sha256": {f: sha256(os.path.join(directory, f)) for f in files}}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def verify(directory: str = PERCEIVE_TINY) -> dict:
    """The manifest of `directory` after checking that every file it lists is there, unchanged."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(f"{path} is missing: expected the manifest written by the perceive job")
    with open(path) as f:
        manifest = json.load(f)
    for name, want in manifest["sha256"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ManifestError(f"{file} is missing (listed in {path})")
        if (got := sha256(file)) != want:
            raise ManifestError(f"{file} has sha256 {got}, but {path} records {want}: the file was changed or damaged")
    return manifest
