"""Reading a Hugging Face checkpoint's safetensors shards tensor by tensor.

The quantizer never holds the whole model: it asks for the tensors of one
decoder layer at a time, straight from the files (which keep per-expert names
even where transformers fuses experts in memory).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["ShardReader", "CheckpointError"]


class CheckpointError(ValueError):
    """The input checkpoint is missing, incomplete or unreadable."""


class ShardReader:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {self.dir} does not exist")
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a Hugging Face model directory")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).is_file():
                    raise CheckpointError(f"{index} names {file}, which is missing from {self.dir}")
            self.files = {name: self.dir / file for name, file in weight_map.items()}
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"no *.safetensors weights in {self.dir} (convert .bin checkpoints with save_pretrained first)"
                )
            self.files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as h:
                    for name in h.keys():
                        self.files[name] = shard
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.dir}")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        t = self._handles[file].get_tensor(name)
        if dtype is not None:
            t = t.to(dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name} in {file} has NaN or infinite values")
        return t.to(device)
