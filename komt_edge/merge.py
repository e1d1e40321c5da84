"""`komt-edge merge BASE ADAPTER -o OUT`: fold a LoRA adapter into full-precision base weights, streaming.

For every targeted linear layer ``W += scale · B · A`` (scale = alpha / r, or alpha / √r with rsLoRA), computed
in float32 and cast back to the base dtype. The output is written tensor by tensor into new safetensors shards:
tensors the adapter does not touch are copied byte for byte from a safetensors base (in the kernel,
copy_file_range), and the merged ones stream through a bounded read → merge → write pipeline
(komt_edge.tensor_pipeline), so resident memory stays at a few tensors (a 7B bf16 merge: well under 4 GiB) instead of the
model, and reading, merging and writing overlap.

An adapter trained with QLoRA on a 4-bit base merges into the full-precision base like any other: the adapter
holds only A and B; the base given here must be the unquantized checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_dir, check_dir_target, check_free_space
from .checkpoint import Checkpoint, read_config
from .errors import KomtError
from .util import read_json_object
from .tensor_pipeline import BufferPool, run_pipeline

PROVENANCE_FILE = "komt_edge_merge.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")

_ST_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                   torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                   torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class LoraPair:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float


@dataclass
class Adapter:
    folder: Path
    config: dict
    pairs: dict[str, LoraPair]  # base weight name → pair
    replacements: dict[str, torch.Tensor]  # base weight name → full tensor (peft modules_to_save)
    warnings: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _strip_prefix(key: str) -> str:
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def read_adapter_config(folder: Path) -> dict:
    """A peft adapter folder's adapter_config.json, or a one-line error (missing, not UTF-8, not a JSON object)."""
    cfg_path = Path(folder) / "adapter_config.json"
    if not cfg_path.is_file():
        raise KomtError(f"{folder} is not a LoRA adapter folder: adapter_config.json is missing")
    return read_json_object(cfg_path, fix="fix it, or save the adapter again with peft")


def load_adapter(folder: Path, *, allow_pickle: bool = False) -> Adapter:
    folder = Path(folder)
    config = read_adapter_config(folder)
    if config.get("peft_type", "LORA") != "LORA":
        raise KomtError(f"{folder} is a {config.get('peft_type')} adapter: komt-edge merges LoRA adapters only")
    if config.get("use_dora"):
        raise KomtError(f"{folder} is a DoRA adapter: merge it with peft's merge_and_unload instead")
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(st))
        except SafetensorError as err:
            raise KomtError(f"{st} is truncated or corrupt ({err}): re-download it") from None
    elif pt.is_file():
        if not allow_pickle:
            raise KomtError(f"{folder} has only a pickle adapter (adapter_model.bin): pass --allow-pickle to load it "
                            "with torch.load(weights_only=True)")
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as err:
            raise KomtError(f"{pt} could not be loaded safely ({type(err).__name__}): it is corrupt or holds "
                            "more than tensors") from None
    else:
        raise KomtError(f"{folder} has no adapter_model.safetensors (or adapter_model.bin)")

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    def pattern_value(module: str, patterns: dict, default):
        for pat, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?{pat}", module):
                return value
        return default

    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        key = _strip_prefix(key)
        if ".lora_embedding_" in key or ".lora_magnitude_vector" in key:
            raise KomtError(f"{folder}: tensor {key} (LoRA on embeddings or DoRA) is not supported by komt-edge merge")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            (a_parts if m.group(2) == "A" else b_parts)[m.group(1)] = value
        elif ".modules_to_save." in key:
            replacements[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)] = value
        elif key.endswith(".weight") or key.endswith(".bias"):
            replacements[key] = value
    if set(a_parts) != set(b_parts):
        odd = sorted(set(a_parts) ^ set(b_parts))[0]
        raise KomtError(f"{folder}: {odd} has a lora_A without lora_B (or the reverse): the adapter is incomplete")
    if not a_parts and not replacements:
        raise KomtError(f"{folder}/adapter_model holds no LoRA weights")

    pairs = {}
    for module, a in a_parts.items():
        b = b_parts[module]
        r = int(pattern_value(module, rank_pattern, r_default))
        alpha = float(pattern_value(module, alpha_pattern, alpha_default))
        if a.shape[0] != r or b.shape[1] != r:
            raise KomtError(f"{folder}: {module} has rank {a.shape[0]} but adapter_config.json says r={r}")
        scale = alpha / (r ** 0.5) if rslora else alpha / r
        pairs[f"{module}.weight"] = LoraPair(a, b, scale)
    warnings = []
    if fan_in_fan_out:
        # Llama, Mistral and Gemma project with nn.Linear, where peft ignores fan_in_fan_out (it is for GPT-2's
        # Conv1D) and warns; the adapter's A and B are then used as stored, and so they are here.
        warnings.append(f"{folder.name}: adapter_config.json sets fan_in_fan_out, which applies to Conv1D layers "
                        "only; ignored for these nn.Linear layers, as peft does")
    return Adapter(folder, config, pairs, replacements, warnings)


MERGE_BLOCK_ELEMENTS = 1 << 18  # float32 work per step: 1 MiB, kept in a core's L2 cache


def merged_weight(base: torch.Tensor, pair: LoraPair, buffers: BufferPool | None = None) -> torch.Tensor:
    """base + scale · B @ A, in float32, cast back to the base dtype.

    Each element goes through the same operations as ``(base.to(float32) + (B @ A) * scale).to(base.dtype)``, so
    the result has the same bits, but a block of rows at a time: the float32 intermediates of a 7B projection
    (hundreds of MB each) never leave the cache (1 MiB blocks run 2.5× faster than 8 MiB ones on one core). The
    result comes from ``buffers`` when given (give it back when written)."""
    if base.dim() != 2:
        delta = (pair.b.to(torch.float32) @ pair.a.to(torch.float32)) * pair.scale
        return (base.to(torch.float32) + delta).to(base.dtype)
    a, b = pair.a.to(torch.float32), pair.b.to(torch.float32)
    rows = base.shape[0]
    out = buffers.take(base.shape, base.dtype) if buffers is not None else torch.empty_like(base)
    step = max(1, MERGE_BLOCK_ELEMENTS // a.shape[1])  # rows per block
    block = torch.empty((min(step, rows), a.shape[1]), dtype=torch.float32)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        work = block[: end - start]
        torch.matmul(b[start:end], a, out=work)
        work.mul_(pair.scale)
        work.add_(base[start:end])  # float32 + the base widened exactly: base.to(float32) + delta
        out[start:end].copy_(work)
    return out


def check_compatible(ckpt: Checkpoint, adapter: Adapter, base: Path) -> None:
    for name, pair in adapter.pairs.items():
        if name not in ckpt:
            raise KomtError(f"adapter {adapter.folder.name} targets {name}, which {base} does not have: "
                            "the adapter belongs to another base model")
        shape = ckpt.info(name).shape
        want = (pair.b.shape[0], pair.a.shape[1])
        if tuple(shape) != want:
            raise KomtError(f"adapter {adapter.folder.name} does not fit {base}: {name} is {tuple(shape)} in the base "
                            f"but {want} in the adapter; merge it into the base it was trained on "
                            f"({adapter.base_model or 'see adapter_config.json'})")
    for name, tensor in adapter.replacements.items():
        if name not in ckpt or tuple(ckpt.info(name).shape) != tuple(tensor.shape):
            raise KomtError(f"adapter {adapter.folder.name} replaces {name} with shape {tuple(tensor.shape)}, "
                            f"which does not match {base}: the adapter belongs to another base model")


class ShardWriter:
    """Writes safetensors shards tensor by tensor: header from the planned shapes, then the data in order."""

    def __init__(self, folder: Path | None, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.folder = folder
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of = {t[0]: i for i, shard in enumerate(self.shards) for t in shard}
        self._nbytes = {t[0]: t[3] for shard in self.shards for t in shard}
        self._open: tuple[int, object] | None = None
        self._expected: list[str] = []

    @property
    def total_bytes(self) -> int:
        return sum(t[3] for shard in self.shards for t in shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name)
        data = tensor.detach().contiguous().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        _write_all(self._open[1], memoryview(data.view(torch.uint8).numpy()))

    def copy_raw(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        """Write tensor ``name`` as the ``nbytes`` bytes at ``offset`` in the file ``src`` (a safetensors shard of
        the same dtype and shape): the bytes ``write`` would write, copied in the kernel without reading them."""
        self._next(name)
        if self._nbytes[name] != nbytes:
            raise RuntimeError(f"tensor {name} has {nbytes} bytes in {src} but {self._nbytes[name]} are planned")
        _copy_range(src, offset, nbytes, self._open[1])

    def _next(self, name: str) -> None:
        idx = self._shard_of[name]
        if self._open is None or self._open[0] != idx:
            self._close_current()
            self._open = (idx, self._start(idx))
            self._expected = [t[0] for t in self.shards[idx]]
        if not self._expected or self._expected.pop(0) != name:
            raise RuntimeError(f"tensor {name} written out of order")

    def _start(self, idx: int):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[idx]:
            header[name] = {"dtype": _ST_DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f = open(self.folder / self.names[idx], "wb", buffering=0)  # unbuffered: copy_raw writes at the fd's offset
        try:
            _write_all(f, len(raw).to_bytes(8, "little") + raw)
        except BaseException:
            f.close()
            raise
        return f

    def _close_current(self) -> None:
        if self._open is not None:
            if self._expected:
                raise RuntimeError(f"shard {self.names[self._open[0]]} is missing {self._expected[0]}")
            self._open[1].close()
            self._open = None

    def abort(self) -> None:
        """Close an open shard file without the completeness check (after a failure; the folder is discarded)."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        self._close_current()
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t[0]: self.names[i] for i, shard in enumerate(self.shards) for t in shard}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def _copy_range(src: Path, offset: int, nbytes: int, dst) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to the unbuffered file ``dst``, in the kernel when it can
    (copy_file_range, else sendfile), else through a buffer."""
    with open(src, "rb", buffering=0) as f:
        fd_in, fd_out = f.fileno(), dst.fileno()
        done = 0
        for fast in ("copy_file_range", "sendfile"):
            if not hasattr(os, fast):
                continue
            try:
                while done < nbytes:
                    if fast == "copy_file_range":
                        n = os.copy_file_range(fd_in, fd_out, min(nbytes - done, 1 << 30), offset + done)
                    else:
                        n = os.sendfile(fd_out, fd_in, offset + done, min(nbytes - done, 1 << 30))
                    if n == 0:
                        raise KomtError(f"{src} ended before the tensor bytes it declares: re-download it")
                    done += n
                return
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM,
                                     errno.EBADF, errno.ETXTBSY):
                    raise
        while done < nbytes:
            chunk = os.pread(fd_in, min(nbytes - done, 16 << 20), offset + done)
            if not chunk:
                raise KomtError(f"{src} ended before the tensor bytes it declares: re-download it")
            _write_all(dst, chunk)
            done += len(chunk)


def merge(base: str | Path, adapter: str | Path, out: str | Path, *, allow_pickle: bool = False,
          max_shard_size: str = "2GB", force: bool = False, n_threads: int | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None) -> Path:
    """Merge ``adapter`` into ``base`` and write a full checkpoint (safetensors, config, tokenizer) at ``out``.

    ``base`` and ``adapter`` are local folders or Hub ids (a zoo name as ``base`` means its merged model).
    ``out`` must be new, empty or an earlier merge's output; ``force`` writes into any other folder, replacing only
    the merge's own files (named through ``log``) and never an input. ``n_threads``: torch threads for the merge
    arithmetic; by default all cores but one, which the writer needs to copy the output into the page cache (on
    two cores, one arithmetic thread merges a 7B model in 0.8× the time of two that compete with the writer)."""
    from .zoo import resolve, resolve_adapter

    out = Path(out)
    check_dir_target(out, force=force, owned_if=(PROVENANCE_FILE,))  # before any download
    shard_bytes = _parse_size(max_shard_size)
    base = resolve(str(base), allow_pickle=allow_pickle, prefer_adapter=False).path
    adapter_dir = resolve_adapter(str(adapter))
    config = read_config(base)
    qcfg = config.get("quantization_config") or {}
    if qcfg:
        raise KomtError(f"{base} is a quantized checkpoint ({qcfg.get('quant_method', 'unknown')}): merge the adapter "
                        "into the full-precision base model")
    lora = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    for warning in lora.warnings:
        log(f"warning: {warning}")
    ckpt = Checkpoint(base, allow_pickle=allow_pickle)
    check_compatible(ckpt, lora, base)
    if out.resolve() in (base.resolve(), adapter_dir.resolve()):
        raise KomtError(f"-o {out} would overwrite an input: choose a new output folder")
    plan = [(n, ckpt.info(n).shape, ckpt.info(n).dtype) for n in ckpt.names]
    writer = ShardWriter(None, plan, shard_bytes)  # shards planned once: the space check, then the writing
    check_free_space(out, writer.total_bytes, f"the merged model ({len(writer.names)} shard(s))")

    with atomic_dir(out, force=force, owned_if=(PROVENANCE_FILE,), log=log) as tmp, \
            tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        writer.folder = tmp
        # Tensors the adapter leaves alone are copied byte for byte from a safetensors base (the bytes `write`
        # would write). The merged ones stream through a bounded pipeline: the next base tensor is read while
        # this one is merged (torch, on all cores but the writer's) and the previous one is written, in order.
        buffers = BufferPool(keep=4)

        def read():
            for shard in writer.shards:
                for name, _shape, dtype, nbytes in shard:
                    raw = ckpt.byte_range(name)
                    if name in lora.pairs:
                        yield name, nbytes, ckpt.read(name, buffers), lora.pairs[name]
                    elif name in lora.replacements:
                        yield name, nbytes, lora.replacements[name].to(dtype), None
                    elif raw is not None:
                        yield name, nbytes, raw, None
                    else:
                        yield name, nbytes, ckpt.get(name), None

        def merge_one(item):
            name, nbytes, tensor, pair = item
            if pair is None:
                return name, nbytes, tensor
            merged = merged_weight(tensor, pair, buffers)
            buffers.give(tensor)
            return name, nbytes, merged

        def write(result):
            name, nbytes, data = result
            if isinstance(data, tuple):
                writer.copy_raw(name, *data)
            else:
                writer.write(name, data)
                buffers.give(data)
            bar.update(nbytes)

        threads = torch.get_num_threads()
        torch.set_num_threads(n_threads or max(1, (os.cpu_count() or 2) - 1))
        try:
            run_pipeline(read(), merge_one, write, read_ahead=1, write_behind=2, name="merge")
            writer.close()
        finally:
            torch.set_num_threads(threads)
            writer.abort()
            ckpt.close()
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in TOKENIZER_FILES:
            src = base / fname
            if not src.is_file() and (adapter_dir / fname).is_file():
                src = adapter_dir / fname
            if src.is_file():
                shutil.copyfile(src, tmp / fname)
        provenance = {"base": str(base), "adapter": str(adapter_dir),
                      "adapter_base_model": lora.base_model, "merged_modules": len(lora.pairs),
                      "replaced_tensors": sorted(lora.replacements)}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return out


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise KomtError(f"--max-shard-size {text!r} is not a size like 2GB or 500MB")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))
