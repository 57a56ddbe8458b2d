"""Reading a Hugging Face checkpoint's safetensors shards tensor by tensor.

The quantizer never holds the whole model: it asks for the tensors of one
decoder layer at a time, straight from the files (which keep per-expert names
even where transformers fuses experts in memory).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vllm_kbvq.format import load_json

__all__ = ["ShardReader", "CheckpointError"]


class CheckpointError(ValueError):
    """The input checkpoint is missing, incomplete or unreadable."""


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be truncated or still "
                              "being copied") from None


class ShardReader:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {self.dir} does not exist")
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a Hugging Face model directory")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = load_json(index, CheckpointError)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} has no \"weight_map\" object of tensor names to file names")
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).is_file():
                    raise CheckpointError(f"{index} names {file}, which is missing from {self.dir}")
            self.files = {name: self.dir / file for name, file in weight_map.items()}
            self._handles = {self.dir / file: _open(self.dir / file) for file in set(weight_map.values())}
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"no *.safetensors weights in {self.dir} (convert .bin checkpoints with save_pretrained first)"
                )
            self.files, self._handles = {}, {}
            for shard in shards:
                self._handles[shard] = h = _open(shard)
                for name in h.keys():
                    self.files[name] = shard

    def release(self) -> None:
        """Close every shard (they reopen on the next ``get``): an open shard stays memory-mapped, and the pages
        read through it count toward this process' resident memory until it is closed (a 28.6 GB model, read
        whole by the checks, would otherwise look resident; the kernel keeps them only as cache)."""
        self._handles.clear()

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its header (nothing read)."""
        return tuple(self._handle(name)[1].get_slice(name).get_shape())

    def _handle(self, name: str):
        """The file holding ``name`` and its open handle (opened on first use, or again after :meth:`release`)."""
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.dir}")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = _open(file)
        return file, self._handles[file]

    def get(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        file, handle = self._handle(name)
        try:
            t = handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({e})") from None
        if dtype is not None:
            t = t.to(dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name} in {file} has NaN or infinite values")
        return t.to(device)
