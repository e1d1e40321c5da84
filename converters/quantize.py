"""llama.cpp's own quantizers and per-tensor type policy, called through the library llama-cpp-python ships.

Nothing here re-implements llama.cpp: tensor data goes through ``ggml_quantize_chunk`` (libggml-base), and
the choice of type per tensor (``llama-quantize``'s default mixes, e.g. ``output.weight`` in Q6_K for
q4_0, the k-quant ``_M`` mixes, shape fallbacks, and a plan's ``--tensor-type`` overrides) comes from llama.cpp's
``llama_quant_compute_types``. So a file written here is, tensor for tensor, what ``llama-quantize`` writes from
the same source. What a file is (its type names, per-tensor types, imatrix) is a ``converters.plan.QuantPlan``.

The pinned llama.cpp revision is recorded in ``vendor/llama.cpp.md``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from komt_edge.errors import KomtError

from .plan import (FLOAT_TYPES, QUANT_TYPES, QuantPlan, display_name, is_kquant_or_iq, mix,  # noqa: F401 - re-exported
                   normalize, parse_types)

# ---------------------------------------------------------------------------------------------------
# Output types: the names users type (-q q4_K_M) are the planner's (converters.plan); what each means to llama.cpp.
# ---------------------------------------------------------------------------------------------------

FLOAT_FTYPES = {key: LlamaFileType[name] for key, name in FLOAT_TYPES.items()}
QUANT_FTYPES = {key: LlamaFileType[name] for key, name in QUANT_TYPES.items()}


def ftype_of(qtype: str) -> LlamaFileType:
    return as_plan(qtype).ftype


def as_plan(plan: QuantPlan | str) -> QuantPlan:
    """A plan, or llama.cpp's own mix for a type name (what callers that name a type mean)."""
    return plan if isinstance(plan, QuantPlan) else mix(plan)


# ---------------------------------------------------------------------------------------------------
# The shipped llama.cpp libraries.
# ---------------------------------------------------------------------------------------------------

class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _QuantModelDesc(ctypes.Structure):
    # struct llama_quant_model_desc (src/llama-ext.h)
    _fields_ = [("architecture", ctypes.c_char_p), ("n_embd", ctypes.c_uint32), ("n_ff", ctypes.c_uint32),
                ("n_layer", ctypes.c_uint32), ("n_head", ctypes.c_uint32), ("n_head_kv", ctypes.c_uint32),
                ("n_expert", ctypes.c_uint32), ("n_embd_head_k", ctypes.c_uint32),
                ("n_embd_head_v", ctypes.c_uint32)]


@dataclass
class _Libs:
    ggml: ctypes.CDLL
    llama: ctypes.CDLL
    ext: dict  # llama.cpp's staging quantization API (llama-ext.h), by plain name


# llama-ext.h is C++ without extern "C", so its functions are exported under Itanium-mangled names. The names
# encode the signatures: if the pinned llama.cpp changes a signature, the lookup fails instead of misbehaving.
_STAGING_API = {
    "llama_quant_model_from_metadata": ("_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
                                        [ctypes.c_void_p], ctypes.c_void_p),
    "llama_quant_init": ("_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
                         [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p),
    "llama_quant_free": ("_Z16llama_quant_freeP19quantize_state_impl", [ctypes.c_void_p], None),
    "llama_quant_tensor_allows_quantization": (
        "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
        [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_bool),
    "llama_quant_compute_types": (
        "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
        [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
         ctypes.c_size_t], None),
}


def _bind_staging_api(llama: ctypes.CDLL) -> dict:
    bound = {}
    for name, (symbol, argtypes, restype) in _STAGING_API.items():
        try:
            fn = getattr(llama, symbol)
        except AttributeError:
            raise RuntimeError(f"the installed llama-cpp-python does not export {name} with the signature "
                               "komt-edge expects: install the version pinned in setup.py (make install)") from None
        fn.argtypes, fn.restype = argtypes, restype
        bound[name] = fn
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    return bound


@lru_cache(maxsize=1)
def libs() -> _Libs:
    """Load libggml-base and libllama from the installed llama-cpp-python and declare what we call."""
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as bindings
    except ImportError as err:  # pragma: no cover - install problem
        raise RuntimeError("llama-cpp-python is not installed: run `make install`") from err
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:  # pragma: no cover - install problem
        raise RuntimeError(f"libggml-base not found in {lib_dir}: reinstall llama-cpp-python")
    ggml = ctypes.CDLL(str(candidates[0]), mode=getattr(os, "RTLD_GLOBAL", 0))
    llama = bindings._lib

    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_blck_size.argtypes = [ctypes.c_int]
    ggml.ggml_blck_size.restype = ctypes.c_int64
    ggml.ggml_init.argtypes = [_GgmlInitParams]
    ggml.ggml_init.restype = ctypes.c_void_p
    ggml.ggml_free.argtypes = [ctypes.c_void_p]
    ggml.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    ggml.ggml_new_tensor.restype = ctypes.c_void_p
    ggml.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_set_name.restype = ctypes.c_void_p

    ext = _bind_staging_api(llama)
    return _Libs(ggml, llama, ext)


# The tensor types llama.cpp's quantizer refuses to write without an importance matrix ("the result will be
# garbage"), for every tensor but the token embedding and the output (llama-quant.cpp, tensor_requires_imatrix).
_IMATRIX_ONLY = {GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS,
                 GGMLQuantizationType.IQ2_S, GGMLQuantizationType.IQ1_M, GGMLQuantizationType.IQ1_S}
_NEVER_NEEDS_IMATRIX = {"token_embd.weight", "per_layer_token_embd.weight", "output.weight"}


def requires_imatrix(tensor_name: str, ggml_type: GGMLQuantizationType, qtype: str) -> bool:
    """Whether llama.cpp writes ``tensor_name`` as ``ggml_type`` in a ``qtype`` file only with an importance
    matrix: the very low-bit IQ types anywhere but the embedding and output, and q2_K inside a q2_K_S file."""
    if tensor_name in _NEVER_NEEDS_IMATRIX:
        return False
    if ggml_type == GGMLQuantizationType.Q2_K:
        return normalize(qtype) == "q2_k_s"
    return ggml_type in _IMATRIX_ONLY


def row_size(ggml_type: GGMLQuantizationType, n_per_row: int) -> int:
    return int(libs().ggml.ggml_row_size(int(ggml_type), n_per_row))


# ---------------------------------------------------------------------------------------------------
# Per-tensor type policy.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's type policy looks at: the architecture name and the hyperparameters."""
    architecture: str  # GGUF architecture name, e.g. "llama"
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int = 0


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order (rows first), as written by the converter
    float_type: GGMLQuantizationType  # the type convert_hf_to_gguf.py would write at the source precision


def tensor_order_key(name: str) -> tuple[int, str]:
    """llama.cpp's weight order (llama_model_loader's weight_name_comparer): by block, then by name."""
    layer = -1
    if name.startswith("blk."):
        head = name[4:].split(".", 1)[0]
        if head.isdigit():
            layer = int(head)
    return layer, name


def _tensor_overrides(plan: QuantPlan):
    """The plan's per-tensor types as llama_model_quantize_params.tt_overrides (llama-quantize's --tensor-type:
    pattern and ggml type, ended by a null pattern), or None for a plain mix. The array is kept alive by the
    pointer returned (its ``_keep``)."""
    import llama_cpp

    from komt_edge.llamacpp.log import route_llama_log

    overrides = plan.overrides()
    if not overrides:
        return None
    route_llama_log()  # llama.cpp logs each override it applies: shown with --verbose only
    array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for item, (pattern, ggml_type) in zip(array, overrides):
        item.pattern = pattern.encode()
        item.type = int(ggml_type)
    array[len(overrides)].pattern = None
    array[len(overrides)].type = llama_cpp.GGML_TYPE_COUNT  # as llama-quantize ends the list
    pointer = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    pointer._keep = array
    return pointer


def compute_types(shape: ModelShape, tensors: list[TensorSpec], plan: QuantPlan) -> list[GGMLQuantizationType]:
    """The type llama-quantize gives each tensor for ``plan``: its base type's mix, without an imatrix, with the
    plan's per-tensor types as llama-quantize's ``--tensor-type`` gives them (llama.cpp applies them: first matching
    pattern wins, then its shape fallbacks).

    ``tensors`` must be in llama.cpp's order (see tensor_order_key): the k-quant mixes count layers.
    """
    import llama_cpp

    lib = libs()
    desc = _QuantModelDesc(shape.architecture.encode(), shape.n_embd, shape.n_ff, shape.n_layer, shape.n_head,
                           shape.n_head_kv, shape.n_expert, shape.head_dim, shape.head_dim)
    model = lib.ext["llama_quant_model_from_metadata"](ctypes.addressof(desc))
    if not model:
        raise RuntimeError(f"llama.cpp does not know the architecture {shape.architecture!r}")
    ftype = plan.ftype
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.tt_overrides = _tensor_overrides(plan)  # compiled by llama_quant_init (params holds the array)
    qs = lib.ext["llama_quant_init"](model, ctypes.addressof(params))
    ctx = lib.ggml.ggml_init(_GgmlInitParams(mem_size=(len(tensors) + 8) * 1024, mem_buffer=None, no_alloc=True))
    try:
        handles = []
        for spec in tensors:
            ne = (ctypes.c_int64 * len(spec.shape))(*reversed(spec.shape))  # ggml order: ne[0] = row length
            t = lib.ggml.ggml_new_tensor(ctx, int(spec.float_type), len(spec.shape), ne)
            lib.ggml.ggml_set_name(t, spec.name.encode())
            handles.append(t)
        # llama_quant_compute_types only accepts quantizable tensors; the rest keep their float type.
        result = [spec.float_type for spec in tensors]
        allows = lib.ext["llama_quant_tensor_allows_quantization"]
        quantizable = [i for i in range(len(tensors)) if allows(qs, handles[i])]
        if quantizable:
            sub = (ctypes.c_void_p * len(quantizable))(*[handles[i] for i in quantizable])
            types = (ctypes.c_int * len(quantizable))()
            lib.ext["llama_quant_compute_types"](qs, int(ftype), sub, types, len(quantizable))
            for j, i in enumerate(quantizable):
                result[i] = GGMLQuantizationType(types[j])
        return result
    finally:
        lib.ggml.ggml_free(ctx)
        lib.ext["llama_quant_free"](qs)
        lib.llama.llama_model_free(model)


# ---------------------------------------------------------------------------------------------------
# Tensor data.
# ---------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 20


def quantize(data: np.ndarray, ggml_type: GGMLQuantizationType, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Quantize a float32 matrix row-wise with llama.cpp's quantizer; returns the raw bytes (uint8 rows).

    F32/F16/BF16 are converted with numpy/gguf-py exactly as convert_hf_to_gguf.py does. Quantized types go
    through ``ggml_quantize_chunk`` in row chunks spread over ``pool`` (ctypes releases the GIL).
    """
    from gguf import quants as gguf_quants

    if ggml_type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if ggml_type == GGMLQuantizationType.BF16:
        return gguf_quants.quantize(data, ggml_type)
    data = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = data.shape[-1]
    nrows = data.size // n_per_row
    rsize = row_size(ggml_type, n_per_row)
    out = np.empty((nrows, rsize), dtype=np.uint8)
    lib = libs().ggml
    src, dst = data.ctypes.data, out.ctypes.data

    def run(first: int, count: int) -> int:
        return lib.ggml_quantize_chunk(int(ggml_type), src, dst, first * n_per_row, count, n_per_row, None)

    chunk = max(1, _CHUNK_ELEMENTS // n_per_row)  # rows per task: about a million weights
    spans = [(r, min(chunk, nrows - r)) for r in range(0, nrows, chunk)]
    if pool is None or len(spans) == 1:
        written = sum(run(r, n) for r, n in spans)
    else:
        written = sum(pool.map(lambda span: run(*span), spans))
    if written != out.nbytes:  # pragma: no cover - would be a llama.cpp bug
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(*data.shape[:-1], rsize)


_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_SCRATCH = threading.local()  # each worker thread's float32 block, reused from tensor to tensor


def _is_f32(a: np.ndarray, bf16: bool) -> bool:
    """Whether ``a`` is already what the quantizer reads: contiguous float32."""
    return not bf16 and a.dtype == np.float32 and a.flags.c_contiguous


def widen(source: np.ndarray, out: np.ndarray | None = None, *, bf16: bool = False) -> np.ndarray:
    """``source`` as float32 (into ``out`` when given, same shape), exactly: float16 and bfloat16 widen without
    rounding. ``bf16``: ``source`` is uint16 holding bfloat16 bits (numpy has no bfloat16), the top half of a
    float32, so widening is a 16-bit shift. Any strides. A contiguous float32 ``source`` is returned as it is when
    no ``out`` is given."""
    if out is None:
        if _is_f32(source, bf16):
            return source
        out = np.empty(source.shape, dtype=np.float32)
    if bf16:
        np.left_shift(source, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, source, casting="same_kind")
    return out


def quantize_all(source: np.ndarray, types: Sequence[GGMLQuantizationType], pool: ThreadPoolExecutor | None = None,
                 *, bf16: bool = False) -> list[np.ndarray]:
    """``quantize(widen(source), t, pool)`` for every ``t`` in ``types``, the same bytes, in one pass over
    ``source``: a block of about a million weights at a time is widened into a scratch buffer of the worker thread
    and quantized to every type while it is in the cache, the blocks spread over ``pool``. The float32 copy of the
    whole tensor is never made (the float types among ``types`` are the exception: they need it).

    ``source``: float32 or float16, or bfloat16 bits with ``bf16`` (see ``widen``), with any strides; its rows are
    its last axis in row-major order, and blocks are cut along its first axis (so a strided view such as the
    converter's permuted q/k weights is quantized without a copy)."""
    n_per_row = source.shape[-1]
    nrows = source.size // n_per_row
    # rows under each index of the first axis; the shape returned is the source's, or (rows, n_per_row) when it
    # splits its rows over more axes (only the bytes are written)
    rows_per_index = nrows // source.shape[0] if source.ndim > 1 else 1
    shape = source.shape if rows_per_index == 1 else (nrows, n_per_row)
    results: list[np.ndarray | None] = [None] * len(types)
    if any(GGMLQuantizationType(t) in _FLOAT_TYPES for t in types):
        full = widen(source, bf16=bf16).reshape(shape)
        for j, t in enumerate(types):
            if GGMLQuantizationType(t) in _FLOAT_TYPES:
                results[j] = quantize(full, t, pool)
    todo = [(j, GGMLQuantizationType(t)) for j, t in enumerate(types) if results[j] is None]
    if not todo:
        return results
    if source.ndim == 1:
        source = source.reshape(1, -1)
    outs = [np.empty((nrows, row_size(t, n_per_row)), dtype=np.uint8) for _, t in todo]
    step = max(1, _CHUNK_ELEMENTS // (n_per_row * rows_per_index))  # first-axis indices per block
    lib = libs().ggml

    def run(first: int) -> int:
        block = source[first:first + step]
        rows = block.size // n_per_row
        if _is_f32(block, bf16):
            data = block
        else:
            buf = getattr(_SCRATCH, "buf", None)
            if buf is None or buf.size < block.size:
                buf = _SCRATCH.buf = np.empty(step * rows_per_index * n_per_row, dtype=np.float32)
            data = widen(block, buf[: block.size].reshape(block.shape), bf16=bf16)
        row0 = first * rows_per_index
        return sum(lib.ggml_quantize_chunk(int(t), data.ctypes.data, out[row0:row0 + rows].ctypes.data, 0, rows,
                                           n_per_row, None) for (_, t), out in zip(todo, outs))

    starts = range(0, source.shape[0], step)
    written = sum(pool.map(run, starts)) if pool is not None and len(starts) > 1 else sum(map(run, starts))
    if written != sum(out.nbytes for out in outs):  # pragma: no cover - would be a llama.cpp bug
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {sum(o.nbytes for o in outs)}")
    for (j, _), out in zip(todo, outs):
        results[j] = out.reshape(*shape[:-1], out.shape[-1])
    return results


# ---------------------------------------------------------------------------------------------------
# Whole files with an importance matrix: llama-quantize's own path.
# ---------------------------------------------------------------------------------------------------

def quantize_file(src: Path, dst: Path, plan: QuantPlan | str, *, imatrix: dict[str, np.ndarray],
                  metadata: dict[str, str | int], n_threads: int | None = None, model: str | None = None) -> None:
    """Quantize the float GGUF ``src`` to ``plan`` (a QuantPlan, or a type name for llama.cpp's own mix) at ``dst``
    with llama.cpp's ``llama_model_quantize``, the function llama-quantize calls: the importance matrix reaches
    each tensor's quantizer as llama-quantize passes it (``imatrix``: weight name → per-column importance,
    flattened over a 3-D weight's matrices), the type mix is the one llama-quantize chooses with an imatrix, and
    the plan's per-tensor types are its ``--tensor-type`` overrides (``tt_overrides``). ``metadata`` is written as
    llama-quantize's KV overrides (its ``quantize.imatrix.*`` provenance keys). ``model``: its name, for the error
    message (``src`` is a hidden temporary file). llama.cpp's log goes through komt-edge's (``komt_edge.llamacpp.log``): its per-tensor
    lines only with --verbose, its reason for failing in the one-line error."""
    import llama_cpp

    from komt_edge.errors import raise_pending
    from komt_edge.llamacpp.log import load_errors, reason

    names = sorted(imatrix)
    arrays = [np.ascontiguousarray(imatrix[n], dtype=np.float32) for n in names]  # alive during the call
    encoded = [n.encode() for n in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (name, arr) in enumerate(zip(encoded, arrays)):
        entries[i].name = name
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    overrides = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
    for o, (key, value) in zip(overrides, metadata.items()):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = str(value).encode()[:127]
    plan = as_plan(plan)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(plan.ftype)
    params.tt_overrides = _tensor_overrides(plan)
    params.nthread = n_threads or os.cpu_count() or 1
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)) if names else None
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    with load_errors() as errors:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    raise_pending()  # a signal that arrived in llama.cpp's log callback during the call
    if rc != 0:
        why = reason(errors)
        raise KomtError(f"llama.cpp could not quantize {model or Path(src).name} to {plan.name}: "
                        + (why or f"code {rc}; run with --verbose to see llama.cpp's log"))
