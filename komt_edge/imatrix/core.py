"""Importance matrices: llama-imatrix's statistics, collected through llama.cpp, in llama.cpp's own file format.

An importance matrix tells llama.cpp's quantizers which input columns of each weight matter: for every weight
that a ``blk.*`` layer multiplies (and ``output.weight`` with ``process_output``), the sum over the evaluated
tokens of each input column's squared activation (``in_sum2``) and the number of tokens (``counts``). The
statistics are llama-imatrix's, collected the way it collects them: llama.cpp evaluates the GGUF and hands every
matrix multiplication's input to :class:`Collector` through the scheduler's eval callback (``cb_eval``); the text
is tokenized once with BOS and cut into ``n_ctx``-token chunks, each starting with BOS, every position computed.

The file (:meth:`Imatrix.write`) is llama.cpp's GGUF imatrix format (``general.type`` = imatrix,
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``, ``<weight>.in_sum2``, ``<weight>.counts``),
which ``llama-quantize --imatrix`` and ``komt-edge gguf --imatrix`` read; :meth:`Imatrix.read` also reads the
legacy ``.dat`` format. :func:`korean_calibration_text` is the calibration split of ``komt_edge.corpora`` (never
the held-out text the benchmarks score), prose and instruction records rendered in the model's komt template.
``komt-edge imatrix`` (:mod:`komt_edge.imatrix.command`) and ``komt-edge gguf --imatrix`` (``komt_edge.gguf``) use
it, and :func:`resolve_imatrix` keeps the Korean one of a conversion beside its files.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..converters.plan import safe_name
from ..errors import KomtError, c_callback, interrupt_pending
from ..util import sha256_json
from ..zoo import ResolvedModel, model_template

DEFAULT_N_CTX = 512
MIN_BATCH_ROWS = 16  # llama-imatrix ignores matrix products of fewer tokens (the ones of a generation step)
KOREAN = "korean"
TEXT_SEPARATOR = "\n\n"  # between calibration documents


# --- the file ------------------------------------------------------------------------------------------------

@dataclass
class Imatrix:
    """Per weight: ``in_sum2`` [n_mat, n_cols] (sums of squared inputs) and ``counts`` [n_mat] (tokens)."""
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # komt-edge's provenance (model, text digest)
    legacy: bool = False  # read from a .dat file: sums are mean squares × ncall, counts are ncall
    path: Path | None = None  # the file it was read from

    def weights(self, name: str) -> np.ndarray | None:
        """The per-column importance llama-quantize passes to the quantizer for ``name`` (flattened over the
        matrices of a 3-D weight): in_sum2 / counts, and 1 where a matrix saw no token."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        sums, counts = entry
        counts = counts.reshape(-1, 1).astype(np.float32)
        out = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1).astype(np.float32)
        return out.reshape(-1)

    def mean_squares(self, name: str) -> np.ndarray:
        """in_sum2 / counts of every matrix of ``name``: what the agreement checks compare."""
        return self.weights(name).reshape(self.entries[name][0].shape)

    def write(self, path: Path) -> Path:
        """llama.cpp's GGUF imatrix file, written atomically (names sorted, as llama-imatrix writes them)."""
        from gguf import GGUFWriter, Keys

        path = Path(path)
        with atomic_file(path) as tmp:
            writer = GGUFWriter(tmp, arch="imatrix")
            del writer.kv_data[0][Keys.General.ARCHITECTURE]  # llama-imatrix writes none
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", list(self.datasets))
            writer.add_uint32("imatrix.chunk_count", int(self.chunk_count))
            writer.add_uint32("imatrix.chunk_size", int(self.chunk_size))
            for key, value in sorted(self.metadata.items()):
                writer.add_string(f"komt_edge.imatrix.{key}", value)
            for name in sorted(self.entries):
                sums, counts = self.entries[name]
                writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, dtype=np.float32))
                writer.add_tensor(f"{name}.counts", np.asarray(counts, dtype=np.float32).reshape(-1, 1))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return path

    @staticmethod
    def written_by_komt_edge(path: Path) -> bool:
        """Whether ``path`` is an importance matrix komt-edge wrote (a GGUF imatrix with komt-edge's provenance
        keys): the one existing file `komt-edge imatrix -o` replaces without --force."""
        from ..converters.gguf_file import GgufHeader

        try:
            with GgufHeader(Path(path)) as h:
                return h.string("general.type") == "imatrix" and any(f"komt_edge.imatrix.{key}" in h
                                                                     for key in ("tokens", "text_sha256", "model"))
        except KomtError:
            return False

    @classmethod
    def read(cls, path: Path) -> "Imatrix":
        """A GGUF imatrix (llama-imatrix's or komt-edge's) or a legacy ``.dat`` file."""
        path = Path(path)
        if not path.is_file():
            raise KomtError(f"imatrix {path} does not exist: compute one with `komt-edge imatrix MODEL -o {path}`")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise KomtError(f"cannot read {path}: {err.strerror or err}") from None
        return cls._read_gguf(path) if magic == b"GGUF" else cls._read_legacy(path)

    @classmethod
    def _read_gguf(cls, path: Path) -> "Imatrix":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as err:  # gguf-py raises ValueError/struct errors on damaged files
            raise KomtError(f"{path} is not a readable GGUF file ({err}): compute the imatrix again") from None
        kind = reader.fields.get("general.type")
        if kind is None or kind.contents() != "imatrix":
            raise KomtError(f"{path} is a GGUF file but not an importance matrix (general.type is "
                            f"{kind.contents() if kind else 'missing'}): pass the .imatrix.gguf file")
        tensors = {t.name: t for t in reader.tensors}
        entries = {}
        for tname, t in tensors.items():
            if not tname.endswith(".in_sum2"):
                continue
            name = tname[: -len(".in_sum2")]
            counts = tensors.get(f"{name}.counts")
            if counts is None:
                raise KomtError(f"{path}: {name} has sums but no counts: the file is damaged, compute it again")
            n_mat = int(np.asarray(counts.data).size)
            sums = np.array(t.data, dtype=np.float32).reshape(n_mat, -1)
            entries[name] = (sums, np.array(counts.data, dtype=np.float32).reshape(-1))
        if not entries:
            raise KomtError(f"{path} holds no importance data: compute the imatrix again")

        def value(key: str, default=None):
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        meta = {k[len("komt_edge.imatrix."):]: str(f.contents()) for k, f in reader.fields.items()
                if k.startswith("komt_edge.imatrix.")}
        return cls(entries, list(value("imatrix.datasets", []) or []), int(value("imatrix.chunk_count", 0)),
                   int(value("imatrix.chunk_size", 0)), meta, path=path)

    @classmethod
    def _read_legacy(cls, path: Path) -> "Imatrix":
        raw = path.read_bytes()
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(raw):
                raise KomtError(f"{path} is neither a GGUF imatrix nor a complete legacy .dat imatrix: pass the "
                                "file llama-imatrix or komt-edge imatrix wrote")
            values = struct.unpack_from(fmt, raw, pos)
            pos += size
            return values

        (n_entries,) = take("<i")
        if n_entries < 1 or n_entries > 1_000_000:
            raise KomtError(f"{path} is not an importance matrix (GGUF or legacy .dat): pass the file "
                            "llama-imatrix or komt-edge imatrix wrote")
        entries = {}
        for _ in range(n_entries):
            (length,) = take("<i")
            if not 0 < length < 4096:
                raise KomtError(f"{path} is not a legacy .dat imatrix (entry name of {length} bytes)")
            name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
            ncall, nval = take("<ii")
            if nval < 1:
                raise KomtError(f"{path}: entry {name} has no values")
            sums = np.array(take(f"<{nval}f"), dtype=np.float32).reshape(1, nval)
            entries[name] = (sums, np.array([ncall], dtype=np.float32))
        chunk_count, datasets = 0, []
        if pos + 4 <= len(raw):
            (chunk_count,) = take("<i")
            if pos + 4 <= len(raw):
                (length,) = take("<i")
                if 0 < length and pos + length <= len(raw):
                    datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
        return cls(entries, datasets, chunk_count, 0, legacy=True, path=path)

    def check_against(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """One-line error unless this imatrix belongs to a model of these weights (numpy-order shapes): every
        entry names one of its weights with the same column count, and every ``blk.*`` matrix has an entry."""
        for name, (sums, _counts) in sorted(self.entries.items()):
            shape = shapes.get(name)
            if shape is None:
                raise KomtError(f"the imatrix has {name}, which {source} does not: it was computed for another "
                                "model; compute one for this model with `komt-edge imatrix`")
            n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            if sums.size != shape[-1] * n_mat:
                raise KomtError(f"the imatrix has {sums.size} values for {name}, whose rows have {shape[-1]} "
                                f"columns in {source}: it was computed for another model; compute one for this "
                                "model with `komt-edge imatrix`")
        missing = [n for n, shape in shapes.items() if n.startswith("blk.") and len(shape) >= 2
                   and n not in self.entries]
        if missing:
            raise KomtError(f"the imatrix has no entry for {missing[0]} (and {len(missing) - 1} more weights of "
                            f"{source}): it was computed for another model; compute one for this model with "
                            "`komt-edge imatrix`")
        self.check_finite()

    def check_finite(self) -> None:
        """One-line error naming the first weight whose statistics hold NaN or infinity: llama.cpp's quantizer
        refuses such a matrix, and says so only in its log."""
        for name, (sums, counts) in sorted(self.entries.items()):
            if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
                bad = int(np.size(sums) - np.isfinite(sums).sum()) + int(np.size(counts) - np.isfinite(counts).sum())
                where = f"{self.path} " if self.path is not None else ""
                raise KomtError(f"the imatrix {where}has {bad} NaN or infinite value(s) for {name}, which llama.cpp's "
                                "quantizer refuses: the file is damaged, or was computed on a model whose activations "
                                "overflow; compute it again with `komt-edge imatrix` (on an f32 or f16 GGUF)")


# --- collecting, through llama.cpp's eval callback ------------------------------------------------------------

class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml (ggml.h): the fields the callback reads."""
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_GGML_TYPE_F32 = 0


@lru_cache(maxsize=1)
def _ggml():
    from ..converters.quantize import libs

    lib = libs().ggml
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    return lib


@lru_cache(maxsize=None)
def _op_name(op: int) -> str:
    return _ggml().ggml_op_name(op).decode()


def weight_name(graph_name: str) -> str:
    """The weight a graph node's source names: ``CPU#blk.0.attn_k.weight#0`` → ``blk.0.attn_k.weight``."""
    if "#" in graph_name:
        return graph_name.split("#")[1]
    return graph_name


class Collector:
    """llama-imatrix's statistics, gathered from llama.cpp's eval callback (one per evaluation run)."""

    def __init__(self, *, process_output: bool = False):
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}  # float64 accumulators [n_mat, n_cols]
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.callback = _eval_callback_type()(self._callback)  # kept alive with the collector

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    @c_callback
    def _callback(self, tensor_ptr: int, ask: bool, _user_data) -> bool:
        if interrupt_pending():  # SIGTERM/Ctrl-C: want this node, then stop the graph (raised after the decode)
            return ask
        try:
            t = _GgmlTensor.from_address(tensor_ptr)
            op = _op_name(t.op)
            if op not in ("MUL_MAT", "MUL_MAT_ID"):
                return False
            src0 = _GgmlTensor.from_address(t.src[0])
            src1 = _GgmlTensor.from_address(t.src[1])
            name = weight_name(src0.name.decode("utf-8", errors="replace"))
            if ask:
                if op == "MUL_MAT_ID":
                    return True
                return src1.ne[1] >= MIN_BATCH_ROWS and src1.type == _GGML_TYPE_F32 and self.wants(name)
            x = _activations(t.src[1], src1, copy=False)  # read during the callback only
            if op == "MUL_MAT_ID":
                self._collect_experts(name, src0, x, t.src[2])
            else:
                self._collect(name, src0, x)
            return True
        except BaseException as err:  # an exception must not cross into C: report it after the decode
            self.error = self.error or err
            return False

    def _collect(self, name: str, src0: _GgmlTensor, x: np.ndarray) -> None:
        n_mat = int(src0.ne[2] * src0.ne[3])
        ne0 = x.shape[-1]
        sums = self.sums.setdefault(name, np.zeros((n_mat, ne0), dtype=np.float64))
        counts = self.counts.setdefault(name, np.zeros(1, dtype=np.float64))
        if sums.shape != (n_mat, ne0):
            raise KomtError(f"inconsistent sizes for {name}: {sums.shape} vs {(n_mat, ne0)}")
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))
                rows = x[i3, i2]  # [ne1 tokens, ne0 columns]: this batch's sum of squares per column
                sums[mat] += np.einsum("ij,ij->j", rows, rows)
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat

    def _collect_experts(self, name: str, src0: _GgmlTensor, x: np.ndarray, ids_ptr: int) -> None:
        ids_t = _GgmlTensor.from_address(ids_ptr)
        n_as = int(src0.ne[2])
        ids = _activations(ids_ptr, ids_t, dtype=np.int32)[0, 0]  # [n_tokens, n_expert_used]
        ne0 = x.shape[-1]
        sums = self.sums.setdefault(name, np.zeros((n_as, ne0), dtype=np.float64))
        counts = self.counts.setdefault(name, np.zeros(n_as, dtype=np.float64))
        tokens = x[0]  # [n_tokens, n_expert_used (or 1, broadcast), ne0]
        for row in range(ids.shape[0]):
            for slot in range(ids.shape[1]):
                ex = int(ids[row, slot])
                v = tokens[row, slot % tokens.shape[1]].astype(np.float64)
                sums[ex] += v * v
                counts[ex] += 1

    def result(self, *, n_ctx: int, datasets: list[str], metadata: dict[str, str]) -> Imatrix:
        entries = {name: (self.sums[name].astype(np.float32), self.counts[name].astype(np.float32))
                   for name in sorted(self.sums)}
        tokens = max((int(c.max()) for c in self.counts.values()), default=0)
        return Imatrix(entries, datasets, tokens // n_ctx, n_ctx, metadata)


def _eval_callback_type():
    import llama_cpp

    return llama_cpp.ggml_backend_sched_eval_callback


def _activations(ptr: int, t: _GgmlTensor, dtype=np.float32, *, copy: bool = True) -> np.ndarray:
    """A tensor's data as a [ne3, ne2, ne1, ne0] array: a copy, or with ``copy=False`` a read-only view that is
    valid only until the callback returns (llama.cpp reuses the buffer)."""
    ne = [int(t.ne[i]) for i in range(4)]
    nb = [int(t.nb[i]) for i in range(4)]
    lib = _ggml()
    nbytes = int(lib.ggml_nbytes(ptr))
    if t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer):
        host = ctypes.create_string_buffer(nbytes)
        lib.ggml_backend_tensor_get(ptr, host, 0, nbytes)
        base = ctypes.addressof(host)
    else:
        base = t.data
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))
    view = np.lib.stride_tricks.as_strided(raw.view(dtype) if nb[0] == np.dtype(dtype).itemsize else raw,
                                           shape=(ne[3], ne[2], ne[1], ne[0]),
                                           strides=(nb[3], nb[2], nb[1], nb[0]), writeable=False)
    return np.array(view, dtype=dtype) if copy or base != t.data else view


# --- computing --------------------------------------------------------------------------------------------

def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    """llama-imatrix's rule: at least two chunks of text; all whole chunks, or the first ``n_chunks``."""
    if n_tokens < 2 * n_ctx:
        raise KomtError(f"the calibration text is {n_tokens} tokens, and an imatrix with --ctx {n_ctx} needs at "
                        f"least {2 * n_ctx}: give a longer text or a smaller --ctx")
    whole = n_tokens // n_ctx
    return whole if not n_chunks else min(n_chunks, whole)


def compute(gguf_file: str | Path, text: str, *, dataset: str, n_ctx: int = DEFAULT_N_CTX,
            n_chunks: int | None = None, n_threads: int | None = None, process_output: bool = False,
            metadata: dict[str, str] | None = None, progress: bool = True) -> Imatrix:
    """The importance matrix of a GGUF model on ``text`` (see the module docstring)."""
    from tqdm import tqdm

    from ..llamacpp import LlamaRunner

    collector = Collector(process_output=process_output)
    with LlamaRunner(gguf_file, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=n_threads,
                     cb_eval=collector.callback) as runner:
        tokens = runner.tokenize(text, add_special=True)
        n = chunk_count(len(tokens), n_ctx, n_chunks)
        for i in tqdm(range(n), desc=f"imatrix {Path(gguf_file).name}", unit="chunk", disable=not progress):
            chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
            if runner.add_bos:
                chunk[0] = runner.bos
            runner.clear()
            runner.decode(chunk, 0, logits_from=0)  # every position computed, as llama-imatrix asks for
            runner.synchronize()
            if collector.error is not None:
                raise collector.error
    if not collector.sums:
        raise KomtError(f"llama.cpp evaluated {Path(gguf_file).name} but no matrix multiplication of a blk.* weight "
                        "reached the collector: the model has no such layers")
    return collector.result(n_ctx=n_ctx, datasets=[dataset], metadata={**(metadata or {}), "tokens": str(n * n_ctx)})


def korean_calibration_text(template=None, source: str = "konlpy") -> tuple[str, str]:
    """The calibration split of ``source`` as komt would see it (prose, and instruction records in the komt
    ``template``), joined into one text; and its description for the file's metadata."""
    from ..corpora import describe, korean_examples

    examples = korean_examples("calibration", source)
    text = TEXT_SEPARATOR.join(e.render(template) for e in examples)
    return text, f"{describe(source)}: calibration split, {len(examples)} documents, {len(text)} characters"


# --- the Korean imatrix of a conversion: computed once per model and text, kept beside its files ------------

def imatrix_name(display: str) -> str:
    """Where ``--imatrix korean`` keeps the importance matrix it computes, next to the model's files."""
    return f"{safe_name(display)}-korean.imatrix.gguf"


def resolve_imatrix(imatrix, source: Path, resolved: ResolvedModel, template: str | None, out: Path, display: str,
                n_threads: int | None, progress: bool) -> tuple[Imatrix, Path]:
    """The imatrix to quantize with, and the file it came from: the user's, or the Korean one (computed on
    ``source`` unless OUT holds one computed for the same model and text)."""
    if imatrix != KOREAN:
        return imatrix, imatrix.path
    path = out / imatrix_name(display)
    text, dataset = korean_calibration_text(model_template(resolved, template if template != "none" else None))
    fingerprint = {"model": model_fingerprint(resolved), "text_sha256": sha256_json(text)}
    if path.is_file():
        cached = Imatrix.read(path)
        if all(cached.metadata.get(k) == v for k, v in fingerprint.items()):
            return cached, Path(path.name)
    matrix = compute(source, text, dataset=dataset, n_threads=n_threads, progress=progress, metadata=fingerprint)
    matrix.write(path)
    return matrix, Path(path.name)


def model_fingerprint(resolved: ResolvedModel) -> str:
    """What the Korean imatrix depends on: the checkpoint's (and adapter's) files, by name, size and mtime."""
    files = []
    for folder in (resolved.path, resolved.adapter):
        if folder is not None:
            files += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(folder).iterdir())
                      if f.is_file()]
    return sha256_json(files)
