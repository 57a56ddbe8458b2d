"""Output files written so that a killed run never leaves a half-written one behind."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    """Write to ``<name>.tmp`` beside ``path``, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def normal_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors writes 0600 files: give the usual umask modes, so a
    server running as another user can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
