"""Read a Hugging Face checkpoint one tensor at a time.

Safetensors shards are memory-mapped (safetensors ``safe_open``), so reading a tensor costs that tensor's
memory and nothing more. Pickle ``.bin`` shards are read only when the caller allows it, and then with
``torch.load(weights_only=True, mmap=True)``: no arbitrary code runs while loading.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import KomtError
from .util import read_json_object


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise KomtError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    return read_json_object(path)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: Path
    offset: int = -1  # safetensors: where the tensor's bytes start in the shard file (-1: a pickle shard)
    nbytes: int = 0  # safetensors: how many bytes it has there


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class Checkpoint:
    """The tensors of a model folder: ``names``, ``info(name)``, ``get(name)``; shards are checked on open."""

    def __init__(self, folder: Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict] = {}
        self._fds: dict[Path, int] = {}
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            for shard in shards:
                self._index_safetensors(shard)
        else:
            bins = sorted(p for p in self.folder.glob("*.bin") if p.name != "training_args.bin")
            if not bins:
                raise KomtError(f"no weights in {self.folder}: expected *.safetensors (or *.bin with --allow-pickle)")
            if not allow_pickle:
                raise KomtError(f"{self.folder} has only pickle weights (*.bin): pass --allow-pickle to load them "
                                "with torch.load(weights_only=True), or convert them to safetensors first")
            for shard in bins:
                self._index_pickle(shard)

    # -- safetensors -------------------------------------------------------------------------------
    def _index_safetensors(self, shard: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(shard), framework="pt")
        except SafetensorError as err:
            raise KomtError(f"{shard} is truncated or corrupt ({err}): re-download it") from None
        except OSError as err:
            raise KomtError(f"cannot read {shard}: {err.strerror or err}") from None
        header_len, header = _safetensors_header(shard)
        end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                   default=0)
        if shard.stat().st_size < end:
            raise KomtError(f"{shard} is truncated ({shard.stat().st_size} of {end} bytes): re-download it")
        self._handles[shard] = handle
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise KomtError(f"{shard}: tensor {name} has unsupported dtype {meta['dtype']}")
            start, stop = meta["data_offsets"]  # relative to the data, which follows the header
            self._infos[name] = TensorInfo(name, tuple(meta["shape"]), dtype, shard, 8 + header_len + start,
                                           stop - start)

    # -- pickle ------------------------------------------------------------------------------------
    def _index_pickle(self, shard: Path) -> None:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise KomtError(f"{shard} could not be loaded safely ({type(err).__name__}): it is corrupt or "
                            "contains more than tensors; convert it to safetensors") from None
        self._pickles[shard] = state
        for name, t in state.items():
            self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, shard)

    # -- access ------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if info.shard in self._handles:
            return self._handles[info.shard].get_tensor(name)
        return self._pickles[info.shard][name]

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(shard, offset, nbytes) of a safetensors tensor's raw little-endian bytes; None for a pickle shard."""
        info = self._infos[name]
        return (info.shard, info.offset, info.nbytes) if info.offset >= 0 else None

    def read(self, name: str, buffers=None) -> torch.Tensor:
        """A tensor of its own (not a view of the memory map), the same values as ``get``. Safetensors bytes are
        read with ``pread``, which releases the GIL: a reader thread overlaps with computing threads. With
        ``buffers`` (a komt_edge.tensor_pipeline.BufferPool) the tensor is one of its buffers."""
        info = self._infos[name]
        if info.offset < 0:
            return self.get(name).clone()
        out = buffers.take(info.shape, info.dtype) if buffers is not None else torch.empty(info.shape, dtype=info.dtype)
        flat = out.reshape(-1)
        buf = memoryview(flat.view(torch.uint8).numpy())  # bool is one byte too
        fd = self._fd(info.shard)
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [buf[done:]], info.offset + done)
            if n <= 0:
                raise KomtError(f"{info.shard} ended inside tensor {name}: the file is truncated; re-download it")
            done += n
        return out

    def _fd(self, shard: Path) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def shards(self) -> list[Path]:
        return sorted({i.shard for i in self._infos.values()})

    def names_in(self, shard: Path) -> Iterator[str]:
        return (n for n, i in self._infos.items() if i.shard == shard)


def _safetensors_header(shard: Path) -> tuple[int, dict]:
    with open(shard, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, json.loads(f.read(header_len))
