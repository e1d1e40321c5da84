"""Reading and splitting GGUF files: the one place komt-edge reads a GGUF file's type and metadata.

The header is parsed by llama.cpp's own GGUF reader (``gguf_init_from_file`` in the libggml-base that
llama-cpp-python ships) without reading tensor data: fast even for a 262k-token vocabulary, where gguf-py's
``GGUFReader`` maps and walks every array. verify, bench, release and the Gemma export all read through
:class:`GgufHeader` / :func:`file_info`; :func:`split_gguf` writes llama.cpp's gguf-split shards with gguf-py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from komt_edge.errors import KomtError
from komt_edge.util import fmt_size

from .plan import FLOAT_TYPES

FLOAT_FILE_TYPES = tuple(FLOAT_TYPES.values())  # the float plans' file types: ALL_F32, MOSTLY_F16, MOSTLY_BF16

_GGUF_TYPE_UINT32, _GGUF_TYPE_BOOL, _GGUF_TYPE_STRING = 4, 7, 8


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    from .quantize import libs

    lib = libs().ggml
    v, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn, args, res in (
        ("gguf_init_from_file", [ctypes.c_char_p, _InitParams], v),
        ("gguf_free", [v], None),
        ("gguf_get_n_tensors", [v], i64),
        ("gguf_get_tensor_name", [v, i64], ctypes.c_char_p),
        ("gguf_get_tensor_type", [v, i64], ctypes.c_int),
        ("gguf_get_tensor_size", [v, i64], ctypes.c_size_t),
        ("gguf_find_key", [v, ctypes.c_char_p], i64),
        ("gguf_get_kv_type", [v, i64], ctypes.c_int),
        ("gguf_get_val_u32", [v, i64], ctypes.c_uint32),
        ("gguf_get_val_bool", [v, i64], ctypes.c_bool),
        ("gguf_get_val_str", [v, i64], ctypes.c_char_p),
        ("gguf_get_arr_n", [v, i64], ctypes.c_size_t),
        ("gguf_get_arr_str", [v, i64, ctypes.c_size_t], ctypes.c_char_p),
        ("gguf_get_arr_data", [v, i64], v),
        ("ggml_type_size", [ctypes.c_int], ctypes.c_size_t),
    ):
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = res
    return lib


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf_file(path: Path) -> None:
    """A one-line error unless ``path`` is a file that starts with the GGUF magic."""
    if not path.exists():
        raise KomtError(f"{path} does not exist: pass a GGUF file (`komt-edge gguf` writes them)")
    if not path.is_file():
        raise KomtError(f"{path} is not a file: pass a GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise KomtError(f"{path} is not a GGUF file (no GGUF magic): pass a file written by `komt-edge gguf`")


def gguf_type(path: Path) -> str | None:
    """``general.type`` of a readable GGUF file ("model", "adapter", "imatrix"), or None (absent or unreadable)."""
    try:
        with GgufHeader(path) as h:
            return h.string("general.type")
    except KomtError:
        return None


def not_a_model(path: Path, what: str = "MODEL") -> str | None:
    """The one-line error for a GGUF file that holds no model (``general.type`` imatrix or adapter): what the file
    is and what to give instead; None for a model (or an unreadable file, which the loader explains)."""
    kind = gguf_type(path)
    if kind == "imatrix":
        return (f"{path} is an importance matrix (general.type = imatrix), not a model: pass a model as {what}; "
                f"an imatrix is for quantizing, `komt-edge gguf HF_MODEL -q TYPE --imatrix {path}`")
    if kind == "adapter":
        return (f"{path} is a LoRA adapter GGUF (general.type = adapter), not a model: pass its base model as "
                f"{what}; llama.cpp applies the adapter on top of a base GGUF (--lora of chat, serve and verify)")
    return None


def check_model_gguf(path: Path, what: str = "MODEL") -> None:
    """``check_gguf_file``, then a one-line error when the file is an importance matrix or a LoRA adapter."""
    check_gguf_file(path)
    message = not_a_model(path, what)
    if message is not None:
        raise KomtError(message)


class GgufHeader:
    """A GGUF file's metadata and tensor infos (no tensor data), open for the duration of a ``with`` block."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_gguf_file(self.path)
        self._lib = _lib()
        self._ctx = self._lib.gguf_init_from_file(str(self.path).encode(), _InitParams(True, None))
        if not self._ctx:
            raise KomtError(f"{self.path} is not a readable GGUF file: convert it again")

    def __enter__(self) -> "GgufHeader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ctx:
            self._lib.gguf_free(self._ctx)
            self._ctx = None

    def _key(self, key: str, kv_type: int | None = None) -> int | None:
        i = self._lib.gguf_find_key(self._ctx, key.encode())
        if i < 0 or (kv_type is not None and self._lib.gguf_get_kv_type(self._ctx, i) != kv_type):
            return None
        return i

    def __contains__(self, key: str) -> bool:
        return self._key(key) is not None

    def u32(self, key: str) -> int | None:
        i = self._key(key, _GGUF_TYPE_UINT32)
        return None if i is None else int(self._lib.gguf_get_val_u32(self._ctx, i))

    def bool(self, key: str) -> bool | None:
        i = self._key(key, _GGUF_TYPE_BOOL)
        return None if i is None else bool(self._lib.gguf_get_val_bool(self._ctx, i))

    def string(self, key: str) -> str | None:
        i = self._key(key, _GGUF_TYPE_STRING)
        return None if i is None else self._lib.gguf_get_val_str(self._ctx, i).decode("utf-8")

    def array_len(self, key: str) -> int:
        i = self._key(key)
        return 0 if i is None else int(self._lib.gguf_get_arr_n(self._ctx, i))

    def strings(self, key: str) -> list[str]:
        i = self._key(key)
        n = 0 if i is None else int(self._lib.gguf_get_arr_n(self._ctx, i))
        return [self._lib.gguf_get_arr_str(self._ctx, i, j).decode("utf-8") for j in range(n)]

    def numbers(self, key: str, ctype) -> list:
        """A numeric array whose element C type is ``ctype`` (ctypes.c_float for scores, c_int32 for types)."""
        i = self._key(key)
        if i is None:
            return []
        n = int(self._lib.gguf_get_arr_n(self._ctx, i))
        return list((ctype * n).from_address(self._lib.gguf_get_arr_data(self._ctx, i)))

    def tensors(self) -> Iterator[tuple[str, int, int, int]]:
        """(name, ggml type, bytes, elements) of every tensor."""
        lib = self._lib
        for i in range(lib.gguf_get_n_tensors(self._ctx)):
            t = lib.gguf_get_tensor_type(self._ctx, i)
            size = int(lib.gguf_get_tensor_size(self._ctx, i))
            yield (lib.gguf_get_tensor_name(self._ctx, i).decode(), t, size,
                   size // int(lib.ggml_type_size(t)) * int(lib.ggml_blck_size(t)))


@dataclass
class FileInfo:
    """What a GGUF file (or a split model, all its shards) is: type mix, size, parameters, the bytes a generated
    token reads, and the metadata komt-edge checks."""
    path: str
    name: str
    architecture: str
    file_type: str  # llama.cpp's ftype name, e.g. MOSTLY_Q4_0
    size_bytes: int  # the file(s) on disk
    tensor_bytes: int  # the weights (what llama-bench calls the model size)
    n_params: int
    n_vocab: int
    tensor_types: dict[str, int]  # ggml type → number of tensors
    bytes_per_token: int  # weights read to generate one token (all but the unused embedding rows)
    size_label: str | None = None  # general.size_label, e.g. 7B
    chat_template: str | None = None  # tokenizer.chat_template

    @property
    def bpw(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else float("nan")

    @property
    def is_float(self) -> bool:
        """f32, f16 or bf16 throughout: a reference for KL divergence."""
        return self.file_type in FLOAT_FILE_TYPES


def _file_type_name(ft: int | None) -> str:
    from gguf import LlamaFileType

    if ft is None:
        return "UNKNOWN"
    try:
        return LlamaFileType(ft).name
    except ValueError:
        return f"FTYPE_{ft}"


def file_info(path: str | Path) -> FileInfo:
    """Facts about a GGUF file from its header (no tensor data is read)."""
    return model_info([path])


def model_info(files: Sequence[str | Path]) -> FileInfo:
    """Facts about a model stored in one GGUF file or in gguf-split shards (metadata from the first)."""
    from gguf import GGMLQuantizationType

    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("model_info needs at least one file")
    sizes: dict[str, int] = {}
    types: dict[str, int] = {}
    n_params = 0
    for k, path in enumerate(paths):
        with GgufHeader(path) as h:
            if k == 0:
                arch = h.string("general.architecture") or "unknown"
                file_type = _file_type_name(h.u32("general.file_type"))
                n_vocab = h.array_len("tokenizer.ggml.tokens")
                size_label = h.string("general.size_label")
                chat_template = h.string("tokenizer.chat_template")
            for name, t, size, n in h.tensors():
                sizes[name] = size
                tname = GGMLQuantizationType(t).name if t in GGMLQuantizationType._value2member_map_ else str(t)
                types[tname] = types.get(tname, 0) + 1
                n_params += n
    total = sum(sizes.values())
    per_token = total
    emb = sizes.get("token_embd.weight", 0)
    if "output.weight" in sizes and n_vocab:
        per_token = total - emb + emb // n_vocab  # the embedding is a lookup: one row per token
    return FileInfo(str(paths[0]), paths[0].name, arch, file_type, sum(p.stat().st_size for p in paths), total,
                    n_params, n_vocab, types, per_token, size_label, chat_template)


def split_gguf(path: Path, max_size: int) -> list[Path]:
    """Split a GGUF file the way llama.cpp's gguf-split does: shards ``NAME-00001-of-0000N.gguf``, each at most
    ``max_size`` bytes, the first with all metadata, each with ``split.no``/``split.count``/``split.tensors.count``.
    llama.cpp loads the model from the first shard. The original file is replaced by the shards."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    path = Path(path)
    reader = GGUFReader(path)
    tensors = list(reader.tensors)
    # Metadata and tensor infos go in front of the data, and every tensor is aligned: keep room for them.
    overhead = int(reader.data_offset) + (reader.alignment + 64) * len(tensors) + 4096
    budget = max_size - overhead
    biggest = max(tensors, key=lambda t: int(t.n_bytes))
    if budget <= 0 or int(biggest.n_bytes) > budget:
        raise KomtError(f"{path.name} cannot be split under {fmt_size(max_size)} per file: tensor {biggest.name} "
                        f"alone is {fmt_size(int(biggest.n_bytes))}; a tensor cannot span files")
    tmp = path.parent / f".{path.stem}.split-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        arch = reader.fields["general.architecture"].contents()
        writer = GGUFWriter(tmp / path.name, arch, split_max_size=budget)
        writer.data_alignment = reader.alignment
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("split."):
                continue
            vtype = GGUFValueType(f.types[0])
            sub_type = None
            if vtype == GGUFValueType.ARRAY:
                if len(f.types) != 2:
                    raise KomtError(f"{path.name}: nested array {key} is not supported by the splitter")
                sub_type = GGUFValueType(f.types[1])
            writer.add_key_value(key, f.contents(), vtype, sub_type=sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, [int(x) for x in reversed(t.shape)], np.dtype(np.float32),
                                   int(t.n_bytes), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data)
        writer.close()
        del reader
        shards = sorted(tmp.glob(f"{path.stem}-*-of-*.gguf"))
        too_big = [s.name for s in shards if s.stat().st_size > max_size]
        if len(shards) < 2 or too_big:
            raise KomtError(f"splitting {path.name} did not give shards under {fmt_size(max_size)} ({too_big})")
        final = []
        for s in shards:
            os.replace(s, path.parent / s.name)
            final.append(path.parent / s.name)
        path.unlink()
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_leftovers(folder: Path) -> Iterator[Path]:
    """Working folders of splits that were interrupted (``.NAME.split-PID``)."""
    return folder.glob(".*.split-*")


# Provenance keys: what each tool says about itself and the model's name. Everything else in two files made from
# the same checkpoint by komt-edge and by llama.cpp must be identical.
PROVENANCE_KEYS = ("GGUF.", "general.name", "general.basename", "general.size_label", "general.quantized_by",
                   "general.finetune", "general.license", "general.source.", "general.base_model.", "komt_edge.")


class RawGguf:
    """A GGUF file's key/value pairs as (value type, raw value bytes) and its tensors as (type name, shape, raw
    bytes), from one walk of the layout over a memory map: for comparing two files bit for bit. (gguf-py's
    GGUFReader makes an array object per vocabulary entry and merge — minutes for Llama 3's 280,000 merges on a
    busy machine; ggml's reader has no raw value access.)"""

    _SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type → size
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: str | Path):
        import mmap
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        check_gguf_file(self.path)
        with open(self.path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        pos = 24

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", data, at)
            return data[at + 8:at + 8 + n].decode("utf-8"), at + 8 + n

        def past(kind: int, at: int) -> int:
            if kind == self._STRING:
                return at + 8 + struct.unpack_from("<Q", data, at)[0]
            if kind == self._ARRAY:
                inner, count = struct.unpack_from("<IQ", data, at)
                at += 12
                if inner in self._SCALAR_BYTES:
                    return at + count * self._SCALAR_BYTES[inner]
                for _ in range(count):
                    at = past(inner, at)
                return at
            return at + self._SCALAR_BYTES[kind]

        self.kv: dict[str, tuple[int, bytes]] = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            end = past(kind, pos + 4)
            self.kv[key] = (kind, data[pos + 4:end])
            pos = end
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", data, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, GGMLQuantizationType(ggml_type), tuple(reversed(dims)), offset))
        align = self.value("general.alignment") if "general.alignment" in self.kv else 32
        start = -(-pos // align) * align
        self._data = data
        self.tensors: dict[str, tuple[str, tuple[int, ...], memoryview]] = {}
        for name, ggml_type, shape, offset in infos:
            block, size = GGML_QUANT_SIZES[ggml_type]
            count = 1
            for d in shape:
                count *= d
            view = memoryview(data)[start + offset:start + offset + count // block * size]
            self.tensors[name] = (ggml_type.name, shape, view)

    def metadata(self, ignore: Sequence[str] = PROVENANCE_KEYS) -> dict[str, tuple[int, bytes]]:
        return {k: v for k, v in self.kv.items() if not k.startswith(tuple(ignore))}

    def value(self, key: str):
        """A string or scalar value (arrays: see ``kv``)."""
        import struct

        kind, raw = self.kv[key]
        if kind == self._STRING:
            return raw[8:].decode("utf-8")
        return struct.unpack({0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                              11: "<q", 12: "<d"}[kind], raw)[0]


def gguf_differences(ours: str | Path, theirs: str | Path, ignore: Sequence[str] = PROVENANCE_KEYS) -> list[str]:
    """How two GGUF files differ, tensor by tensor (name, type, shape, bytes) and key by key (value type and bytes),
    keys starting with ``ignore`` aside; empty when they are identical."""
    a, b = RawGguf(ours), RawGguf(theirs)
    found = [f"tensor {n} only in {p.name}" for n, p in ((n, a.path) for n in a.tensors.keys() - b.tensors.keys())]
    found += [f"tensor {n} only in {p.name}" for n, p in ((n, b.path) for n in b.tensors.keys() - a.tensors.keys())]
    for name in sorted(a.tensors.keys() & b.tensors.keys()):
        (ka, sa, da), (kb, sb, db) = a.tensors[name], b.tensors[name]
        if (ka, sa) != (kb, sb):
            found.append(f"tensor {name}: {ka} {sa} vs {kb} {sb}")
        elif da != db:
            found.append(f"tensor {name}: {ka} data differs")
    ma, mb = a.metadata(ignore), b.metadata(ignore)
    found += [f"key {k} only in {a.path.name}" for k in sorted(ma.keys() - mb.keys())]
    found += [f"key {k} only in {b.path.name}" for k in sorted(mb.keys() - ma.keys())]
    found += [f"key {k}: {ma[k][1][:80]!r} vs {mb[k][1][:80]!r}" for k in sorted(ma.keys() & mb.keys())
              if ma[k] != mb[k]]
    return found
