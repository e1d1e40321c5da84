"""`komt-edge bench speed|quality`: what each GGUF file costs (tokens/s) and what it loses in Korean (KL, perplexity).

Both measurements follow llama.cpp's own tools, through the llama.cpp library that llama-cpp-python ships, so that
the numbers can be checked against ``llama-bench`` and ``llama-perplexity`` (README, "Benchmarks"):

- **speed** (:func:`speed`) is llama-bench's protocol: ``pp512`` decodes 512 random tokens in one batch (n_batch
  2048, n_ubatch 512, a context of exactly 512), ``tg128`` decodes 128 random tokens one at a time (a context of
  128); one warm-up run, then ``repetitions`` timed runs from an empty KV cache; tokens/s is computed per run and
  reported as mean ± sample sd. Tokenization and sampling are not timed (random token ids, no sampler). Added:
  Korean characters per second (tokens/s × the file's characters per token on held-out Korean text), bits per
  weight, and tg as a fraction of the memory-bandwidth roofline (bytes read per generated token ÷ the measured
  read bandwidth of this machine at the same thread count).
- **quality** (:func:`quality`) is llama-perplexity's protocol: the whole text is tokenized once (with BOS), cut
  into ``n_ctx`` chunks, the first token of each chunk replaced by BOS, and only the second half of each chunk is
  scored (positions n_ctx/2 … n_ctx-2 predict the next token). Against a reference file it computes what
  ``llama-perplexity --kl-divergence`` prints: mean/median/p99/max KL(reference ‖ file), same-top-token rate,
  RMS Δp, PPL ratio and ΔPPL, with llama.cpp's uncertainty formulas. The reference's log-probabilities are kept
  for one chunk at a time and every file is compared against them in the same pass: no logits file is written
  (llama.cpp's base file is ~3 GB per 12k tokens for a 262k vocabulary). KL is computed from full float32
  log-probabilities, where llama.cpp stores the reference as 16-bit codes and drops p < e⁻¹⁶: the two agree to
  the precision that matters (README).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Self, Sequence

import numpy as np

from .errors import KomtError, read_user_text
from .llama_log import load_errors, reason

DEFAULT_N_CTX = 512
PP_TOKENS = 512
TG_TOKENS = 128
REPETITIONS = 5


# ---------------------------------------------------------------------------------------------------
# GGUF file facts, read with llama.cpp's own GGUF parser (libggml-base): fast even for 262k-token vocabularies.
# ---------------------------------------------------------------------------------------------------

class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _gguf_lib() -> ctypes.CDLL:
    from .converters.quantize import libs

    lib = libs().ggml
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_get_kv_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_kv_type.restype = ctypes.c_int
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    lib.gguf_get_arr_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_n.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    return lib


_GGUF_TYPE_UINT32, _GGUF_TYPE_STRING = 4, 8


@dataclass
class FileInfo:
    """What a GGUF file is: type mix, size, parameters and the bytes a generated token reads."""
    path: str
    name: str
    architecture: str
    file_type: str  # llama.cpp's ftype name, e.g. MOSTLY_Q4_0
    size_bytes: int  # the file on disk
    tensor_bytes: int  # the weights (what llama-bench calls the model size)
    n_params: int
    n_vocab: int
    tensor_types: dict[str, int]  # ggml type → number of tensors
    bytes_per_token: int  # weights read to generate one token (all but the unused embedding rows)

    @property
    def bpw(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else float("nan")


def file_info(path: str | Path) -> FileInfo:
    """Facts about a GGUF file from its header (no tensor data is read)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    path = Path(path)
    _check_file(path)
    lib = _gguf_lib()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        raise KomtError(f"{path} is not a readable GGUF file: convert it again")
    try:
        def u32(key: str) -> int | None:
            i = lib.gguf_find_key(ctx, key.encode())
            return int(lib.gguf_get_val_u32(ctx, i)) if i >= 0 and lib.gguf_get_kv_type(ctx, i) == _GGUF_TYPE_UINT32 \
                else None

        def string(key: str) -> str | None:
            i = lib.gguf_find_key(ctx, key.encode())
            return lib.gguf_get_val_str(ctx, i).decode() if i >= 0 and \
                lib.gguf_get_kv_type(ctx, i) == _GGUF_TYPE_STRING else None

        arch = string("general.architecture") or "unknown"
        ft = u32("general.file_type")
        try:
            file_type = LlamaFileType(ft).name if ft is not None else "UNKNOWN"
        except ValueError:
            file_type = f"FTYPE_{ft}"
        tok = lib.gguf_find_key(ctx, b"tokenizer.ggml.tokens")
        n_vocab = int(lib.gguf_get_arr_n(ctx, tok)) if tok >= 0 else 0
        sizes: dict[str, int] = {}
        types: dict[str, int] = {}
        n_params = 0
        for i in range(lib.gguf_get_n_tensors(ctx)):
            name = lib.gguf_get_tensor_name(ctx, i).decode()
            t = lib.gguf_get_tensor_type(ctx, i)
            size = int(lib.gguf_get_tensor_size(ctx, i))
            sizes[name] = size
            tname = GGMLQuantizationType(t).name if t in GGMLQuantizationType._value2member_map_ else str(t)
            types[tname] = types.get(tname, 0) + 1
            # elements = bytes / type size * block size
            n_params += size // int(lib.ggml_type_size(t)) * int(lib.ggml_blck_size(t))
    finally:
        lib.gguf_free(ctx)
    total = sum(sizes.values())
    per_token = total
    emb = sizes.get("token_embd.weight", 0)
    if "output.weight" in sizes and n_vocab:
        per_token = total - emb + emb // n_vocab  # the embedding is a lookup: one row per token
    return FileInfo(str(path), path.name, arch, file_type, path.stat().st_size, total, n_params, n_vocab, types,
                    per_token)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise KomtError(f"{path} does not exist: pass a GGUF file (`komt-edge gguf` writes them)")
    if not path.is_file():
        raise KomtError(f"{path} is not a file: pass a GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise KomtError(f"{path} is not a GGUF file (no GGUF magic): pass a file written by `komt-edge gguf`")


# ---------------------------------------------------------------------------------------------------
# llama.cpp through its C API (llama-cpp-python's bindings), driven the way llama-bench/llama-perplexity drive it.
# ---------------------------------------------------------------------------------------------------

_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # ggml_log_level in the pinned ggml (llama-cpp-python's own map predates it)
_last_level = [0]


def _quiet_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp's log, errors only: warnings such as the SWA-cache notice would drown the tables."""
    if level != _GGML_LOG_CONT:
        _last_level[0] = level
    if _last_level[0] == _GGML_LOG_ERROR:
        print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)


@lru_cache(maxsize=1)
def _llama():
    import llama_cpp

    llama_cpp.llama_backend_init()
    callback = llama_cpp.llama_log_callback(_quiet_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _llama.callback = callback  # keep the ctypes thunk alive
    return llama_cpp


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (the PyPI sdist build is CPU-only)."""
    return bool(_llama().llama_supports_gpu_offload())


class _Closing:
    """``with`` support and a best-effort close at garbage collection, for wrappers of llama.cpp handles."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class LlamaModel(_Closing):
    """One loaded llama.cpp model (weights repacked for the CPU where llama.cpp does so). Several contexts can use
    it in turn, as llama-bench runs its pp and tg tests on one load."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0):
        llama_cpp = _llama()
        path = Path(path)
        _check_file(path)
        self.path = path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        with load_errors() as errors:
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise KomtError(f"llama.cpp could not load {path}: " + (reason(errors) or "the file is damaged, not a "
                            "model, or of an architecture this llama.cpp does not know"))
        self._lib = llama_cpp

    def close(self) -> None:
        if getattr(self, "model", None):
            self._lib.llama_model_free(self.model)
            self.model = None


class LlamaRunner(_Closing):
    """One llama.cpp context: tokenize, decode batches, read logits; nothing sampled. ``model`` is a file (loaded
    with ``n_gpu_layers`` and freed with the runner) or a :class:`LlamaModel` the caller keeps."""

    def __init__(self, model: str | Path | LlamaModel, *, n_ctx: int, n_batch: int | None = None,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: str = "auto"):
        llama_cpp = _llama()
        self._owned = None if isinstance(model, LlamaModel) else LlamaModel(model, n_gpu_layers=n_gpu_layers)
        loaded = self._owned or model
        self.path = loaded.path
        self.model = loaded.model
        self.n_threads = n_threads or os.cpu_count() or 1
        self.n_batch = n_batch or max(n_ctx, 2048)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(n_ubatch, self.n_batch)
        cparams.n_seq_max = 1
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                   "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        cparams.no_perf = True
        cparams.swa_full = False  # as llama-bench and llama-perplexity (common_params) set it
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            if self._owned:
                self._owned.close()
            raise KomtError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path}: lower --ctx")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._lib = llama_cpp

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool = True) -> np.ndarray:
        """llama.cpp's tokenization, as llama-perplexity's common_tokenize(ctx, text, add_special, false)."""
        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        out = (ctypes.c_int32 * n_max)()
        n = self._lib.llama_tokenize(self.vocab, raw, len(raw), out, n_max, add_special, False)
        if n < 0:  # byte fallback on escaped spaces ("▁" is 3 bytes) can exceed one token per input byte
            n_max = -n
            out = (ctypes.c_int32 * n_max)()
            n = self._lib.llama_tokenize(self.vocab, raw, len(raw), out, n_max, add_special, False)
        return np.frombuffer(out, dtype=np.int32, count=n).copy()

    def clear(self, data: bool = True) -> None:
        """Empty the KV cache; ``data=False`` keeps the buffers' bytes (llama-bench's reset between runs)."""
        self._lib.llama_memory_clear(self.mem, data)

    def decode(self, tokens: Sequence[int], pos0: int = 0, logits_from: int | None = None) -> int:
        """Decode ``tokens`` at positions pos0…; logits for positions ≥ ``logits_from`` (default: the last only).
        Returns the number of output rows."""
        b = self._batch
        n = len(tokens)
        if n > self.n_batch or pos0 + n > self.n_ctx:
            raise ValueError(f"{n} tokens at position {pos0} exceed n_batch {self.n_batch} or n_ctx {self.n_ctx}")
        n_out = 0
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            want = (i == n - 1) if logits_from is None else (pos0 + i >= logits_from)
            b.logits[i] = want
            n_out += want
        b.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise KomtError(f"llama.cpp failed to decode a batch of {n} tokens in {self.path.name} (code {rc})")
        return n_out

    def synchronize(self) -> None:
        self._lib.llama_synchronize(self.ctx)

    def logits(self, n_rows: int) -> np.ndarray:
        """The output rows of the last decode, [n_rows, n_vocab] float32 (a view into llama.cpp's buffer)."""
        ptr = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows * self.n_vocab,)).reshape(n_rows, self.n_vocab)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ctx)
            self.ctx = None
            if self._owned:
                self._owned.close()


# ---------------------------------------------------------------------------------------------------
# Environment: versions and hardware, for every JSON report.
# ---------------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and hardware: what a reader needs to compare two benchmark JSON files."""
    from . import __version__

    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - torch is a dependency, but a broken CUDA install must not stop a report
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "komt_edge": __version__,
        "llama_cpp_python": _version("llama-cpp-python"),
        "llama_cpp_system_info": _llama().llama_print_system_info().decode().strip(),
        "gguf": _version("gguf"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _mem_total_bytes(),
        "gpus": gpus,
        "gpu_offload_in_llama_cpp": gpu_offload_supported(),
        "load_average": list(load) if load else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------------
# Korean text.
# ---------------------------------------------------------------------------------------------------

def korean_eval_text(text: str | Path | None = None, *, source: str = "konlpy") -> tuple[str, str]:
    """The evaluation text and a description: a user's UTF-8 file, else the held-out split of a built-in
    corpus (``komt_edge.corpora``: never seen by calibration)."""
    if text is not None:
        path = Path(text)
        body = read_user_text(path, missing=f"{path} is not a file: pass a UTF-8 text file with --text")
        if not body.strip():
            raise KomtError(f"{path} is empty")
        return body, f"file {path.name} ({len(body)} characters)"
    from . import corpora

    docs = corpora.korean_texts("heldout", source=source)
    body = "\n\n".join(docs)
    return body, f"{source} held-out split ({len(docs)} documents, {len(body)} characters)"


# ---------------------------------------------------------------------------------------------------
# Quality: perplexity and KL divergence, llama-perplexity's protocol.
# ---------------------------------------------------------------------------------------------------

@dataclass
class KLStats:
    """llama-perplexity --kl-divergence's statistics for one file against the reference."""
    mean_kld: float
    mean_kld_unc: float
    median_kld: float
    p90_kld: float
    p99_kld: float
    p999_kld: float
    max_kld: float
    same_top: float  # fraction of positions whose argmax equals the reference's
    same_top_unc: float
    rms_dp: float  # RMS of the change in the probability of the actual next token
    rms_dp_unc: float
    ppl_base: float
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float
    delta_ppl: float
    delta_ppl_unc: float


@dataclass
class QualityResult:
    file: FileInfo
    tokens: int  # scored tokens
    ppl: float
    ppl_unc: float
    kl: KLStats | None = None
    seconds: float = 0.0


@dataclass
class QualityReport:
    results: list[QualityResult]
    reference: str | None
    corpus: str
    n_ctx: int
    n_chunks: int
    tokens_total: int
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "quality", **asdict(self)}


class _Acc:
    """Running sums, as llama.cpp's kl_divergence_result."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.nll_base: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []
        self.same_top = 0
        self.count = 0


def _mean_unc(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and standard error (0 for ≤ 10 values)."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(values.sum(dtype=np.float64) / n)
    df = float((values.astype(np.float64) ** 2).sum() / n - f * f)
    return f, (np.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _log_softmax_rows(x: np.ndarray):
    """Row-wise log-softmax of a logits block as llama.cpp computes it (float32 exponentials summed in float64),
    with torch's vectorised kernels; a new tensor, sharing nothing with llama.cpp's buffer."""
    import torch

    z = torch.from_numpy(x)
    z = z - z.max(dim=1, keepdim=True).values
    lse = torch.log(torch.exp(z).sum(dim=1, keepdim=True, dtype=torch.float64)).to(torch.float32)
    return z.sub_(lse)


_ROW_BLOCK = 32  # rows per block of vocabulary-wide arithmetic: bounds temporaries for 262k vocabularies


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), _ROW_BLOCK):
        lp = _log_softmax_rows(logits[s:s + _ROW_BLOCK]).numpy()
        out[s:s + _ROW_BLOCK] = -lp[np.arange(len(lp)), targets[s:s + _ROW_BLOCK]]
    return out


def chunk_plan(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks llama-perplexity scores: all whole chunks, at least two."""
    if n_ctx < 8:
        raise KomtError(f"--ctx {n_ctx} is too small: use at least 8 (llama-perplexity's default is 512)")
    if n_tokens < 2 * n_ctx:
        raise KomtError(f"the text is {n_tokens} tokens, shorter than two chunks of {n_ctx}: llama-perplexity needs "
                        f"at least {2 * n_ctx}; pass a longer text or a smaller --ctx")
    total = n_tokens // n_ctx
    return total if n_chunks is None or n_chunks <= 0 else min(n_chunks, total)


def _plan_groups(sizes: list[int], ref_size: int, budget: int | None) -> list[list[int]]:
    """Files evaluated together in one pass over the text, so that the reference runs once per group."""
    if budget is None:
        return [list(range(len(sizes)))]
    groups: list[list[int]] = []
    current: list[int] = []
    used = ref_size
    for i, s in enumerate(sizes):
        if current and used + s > budget:
            groups.append(current)
            current, used = [], ref_size
        current.append(i)
        used += s
    if current:
        groups.append(current)
    return groups


def quality(files: Sequence[str | Path], reference: str | Path | None = None, *, text: str | Path | None = None,
            source: str = "konlpy", n_ctx: int = DEFAULT_N_CTX, n_chunks: int | None = None,
            n_threads: int | None = None, n_gpu_layers: int = 0, progress: bool = True,
            memory_budget: int | None = None) -> QualityReport:
    """Perplexity of every file on Korean text and, with a reference, llama-perplexity's KL statistics.

    ``text`` is a UTF-8 file (default: the held-out split of the built-in corpus ``source``). Files and the
    reference are loaded together when they fit in ``memory_budget`` bytes (default: 90% of available memory);
    otherwise they are compared in groups and the reference is re-evaluated per group.
    """
    from tqdm.auto import tqdm

    if not files:
        raise KomtError("no GGUF file given: pass one or more files to benchmark")
    paths = [Path(f) for f in files]
    infos = [file_info(p) for p in paths]
    ref_info = file_info(reference) if reference is not None else None
    body, corpus = korean_eval_text(text, source=source)

    opts = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx), n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    # Tokenize with the reference (or the first file); every file must tokenize the text identically.
    tok_path = Path(reference) if reference is not None else paths[0]
    with LlamaRunner(tok_path, **opts) as first:
        tokens = first.tokenize(body)
        prefix = first.tokenize(body[:4000])
        n_vocab, add_bos, bos = first.n_vocab, first.add_bos, first.bos
    chunks = chunk_plan(len(tokens), n_ctx, n_chunks)
    half = n_ctx // 2
    scored_per_chunk = n_ctx - 1 - half

    if memory_budget is None:
        avail = mem_available_bytes()
        memory_budget = int(avail * 0.9) if avail else None
    groups = _plan_groups([i.size_bytes for i in infos], ref_info.size_bytes if ref_info else 0, memory_budget)

    accs = [_Acc() for _ in paths]
    seconds = [0.0 for _ in paths]
    bar = tqdm(total=chunks * (len(paths) + (len(groups) if reference is not None else 0)), unit="chunk",
               desc="quality", disable=not progress)
    try:
        for group in groups:
            runners: list[LlamaRunner] = []
            ref = None
            try:
                if reference is not None:
                    ref = LlamaRunner(reference, **opts)
                for i in group:
                    r = LlamaRunner(paths[i], **opts)
                    runners.append(r)
                    if r.n_vocab != n_vocab:
                        raise KomtError(f"{paths[i].name} has {r.n_vocab} tokens in its vocabulary but "
                                        f"{tok_path.name} has {n_vocab}: compare files of the same model")
                    if not np.array_equal(r.tokenize(body[:4000]), prefix):
                        raise KomtError(f"{paths[i].name} tokenizes the text differently from {tok_path.name}: "
                                        "compare files made from the same model")
                for c in range(chunks):
                    chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
                    if add_bos:
                        chunk[0] = bos
                    targets = chunk[half + 1:]
                    ref_lp = None
                    nll_base = None
                    if ref is not None:
                        ref.clear()
                        n_out = ref.decode(chunk, 0, logits_from=half)
                        ref_logits = ref.logits(n_out)[:scored_per_chunk]
                        ref_lp = np.empty((scored_per_chunk, n_vocab), dtype=np.float32)
                        for s in range(0, scored_per_chunk, _ROW_BLOCK):
                            ref_lp[s:s + _ROW_BLOCK] = _log_softmax_rows(ref_logits[s:s + _ROW_BLOCK]).numpy()
                        nll_base = -ref_lp[np.arange(scored_per_chunk), targets].astype(np.float64)
                        bar.update(1)
                    for r, i in zip(runners, group):
                        t0 = time.perf_counter()
                        r.clear()
                        n_out = r.decode(chunk, 0, logits_from=half)
                        logits = r.logits(n_out)[:scored_per_chunk]
                        acc = accs[i]
                        if ref_lp is None:
                            acc.nll.append(_nll_rows(logits, targets))
                        else:
                            _compare_chunk(acc, logits, ref_lp, targets, nll_base)
                        acc.count += scored_per_chunk
                        seconds[i] += time.perf_counter() - t0
                        bar.update(1)
            finally:
                for r in runners:
                    r.close()
                if ref is not None:
                    ref.close()
    finally:
        bar.close()

    results = []
    for info, acc, secs in zip(infos, accs, seconds):
        nll = np.concatenate(acc.nll)
        lnppl, lnppl_unc = _mean_unc(nll)
        ppl = float(np.exp(lnppl))
        res = QualityResult(info, int(len(nll)), ppl, ppl * lnppl_unc, seconds=secs)
        if reference is not None:
            res.kl = _kl_stats(acc, nll)
        results.append(res)
    return QualityReport(results, str(reference) if reference is not None else None, corpus, n_ctx, chunks,
                         int(len(tokens)), environment())


def _compare_chunk(acc: _Acc, logits: np.ndarray, ref_lp: np.ndarray, targets: np.ndarray,
                   nll_base: np.ndarray) -> None:
    import torch

    n = len(targets)
    kld = np.empty(n, dtype=np.float64)
    nll = np.empty(n, dtype=np.float64)
    same = 0
    for s in range(0, n, _ROW_BLOCK):
        lq = _log_softmax_rows(logits[s:s + _ROW_BLOCK])
        lp = torch.from_numpy(ref_lp[s:s + _ROW_BLOCK])
        kld[s:s + _ROW_BLOCK] = (lp.exp() * (lp - lq)).sum(dim=1, dtype=torch.float64).numpy()
        rows = torch.arange(len(lq))
        nll[s:s + _ROW_BLOCK] = -lq[rows, torch.from_numpy(targets[s:s + _ROW_BLOCK]).long()].double().numpy()
        same += int((lq.argmax(dim=1) == lp.argmax(dim=1)).sum())
    acc.kld.append(np.maximum(kld, 0.0))  # rounding can make a zero KL slightly negative
    acc.nll.append(nll)
    acc.nll_base.append(nll_base)
    acc.dp.append(np.exp(-nll) - np.exp(-nll_base))
    acc.same_top += same


def _kl_stats(acc: _Acc, nll: np.ndarray) -> KLStats:
    kld = np.concatenate(acc.kld)
    base = np.concatenate(acc.nll_base)
    dp = np.concatenate(acc.dp)
    n = len(kld)
    ln, ln_unc = _mean_unc(nll)
    lb, lb_unc = _mean_unc(base)
    cov = 0.0
    if n >= 10:
        cov = float(((nll * base).sum() / n - (nll.sum() / n) * (base.sum() / n)) / (n - 1))
    ratio_ln = ln - lb
    ratio_ln_unc = float(np.sqrt(max(ln_unc ** 2 + lb_unc ** 2 - 2 * cov, 0.0)))
    ppl, ppl_base = float(np.exp(ln)), float(np.exp(lb))
    ppl_unc, base_unc = ppl * ln_unc, ppl_base * lb_unc
    ppl_cov = ppl * ppl_base * cov
    mean_kld, mean_kld_unc = _mean_unc(kld)
    mse, mse_unc = _mean_unc(dp ** 2)
    rms = float(np.sqrt(mse))
    top = acc.same_top / n
    return KLStats(
        mean_kld=mean_kld, mean_kld_unc=mean_kld_unc,
        median_kld=float(np.median(kld)), p90_kld=float(np.percentile(kld, 90)),
        p99_kld=float(np.percentile(kld, 99)), p999_kld=float(np.percentile(kld, 99.9)), max_kld=float(kld.max()),
        same_top=top, same_top_unc=float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else 0.0,
        rms_dp=rms, rms_dp_unc=(0.5 / rms * mse_unc) if rms > 0 else 0.0,
        ppl_base=ppl_base, ln_ppl_ratio=ratio_ln, ln_ppl_ratio_unc=ratio_ln_unc,
        ppl_ratio=float(np.exp(ratio_ln)), ppl_ratio_unc=float(np.exp(ratio_ln)) * ratio_ln_unc,
        delta_ppl=ppl - ppl_base,
        delta_ppl_unc=float(np.sqrt(max(ppl_unc ** 2 + base_unc ** 2 - 2 * ppl_cov, 0.0))),
    )


# ---------------------------------------------------------------------------------------------------
# Speed: llama-bench's pp/tg, Korean characters per second, the bandwidth roofline.
# ---------------------------------------------------------------------------------------------------

@dataclass
class Rate:
    """One llama-bench test: tokens per run, tokens/s per run, mean ± sample sd."""
    test: str  # "pp512" / "tg128"
    n_tokens: int
    samples_ts: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ts))

    @property
    def sd(self) -> float:
        return float(np.std(self.samples_ts, ddof=1)) if len(self.samples_ts) > 1 else 0.0


@dataclass
class SpeedResult:
    file: FileInfo
    backend: str  # "CPU" or the GPU name
    n_threads: int
    n_gpu_layers: int
    pp: Rate
    tg: Rate
    chars_per_token: float | None  # Korean characters per token with this file's tokenizer
    bandwidth_bytes_s: float | None  # measured read bandwidth at n_threads
    load_average: list[float] | None = None

    @property
    def pp_chars_s(self) -> float | None:
        return self.pp.mean * self.chars_per_token if self.chars_per_token else None

    @property
    def tg_chars_s(self) -> float | None:
        return self.tg.mean * self.chars_per_token if self.chars_per_token else None

    @property
    def roofline_tg(self) -> float | None:
        """The bandwidth-bound generation rate: bandwidth ÷ bytes read per token."""
        if not self.bandwidth_bytes_s:
            return None
        return self.bandwidth_bytes_s / self.file.bytes_per_token

    @property
    def roofline_fraction(self) -> float | None:
        roof = self.roofline_tg
        return self.tg.mean / roof if roof else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["file"]["bpw"] = self.file.bpw
        for k in ("pp", "tg"):
            d[k].update(mean=getattr(self, k).mean, sd=getattr(self, k).sd)
        d.update(pp_chars_s=self.pp_chars_s, tg_chars_s=self.tg_chars_s, roofline_tg=self.roofline_tg,
                 roofline_fraction=self.roofline_fraction)
        return d


@dataclass
class CudaRow:
    """One side-by-side GPU measurement, or the reason there is none."""
    engine: str  # "llama.cpp (all layers on GPU)", "transformers fp16", ...
    model: str
    status: str  # "ok" or why not measured ("no GPU")
    pp_ts: float | None = None
    tg_ts: float | None = None
    peak_gpu_bytes: int | None = None


@dataclass
class SpeedReport:
    results: list[SpeedResult]
    bandwidth: dict[int, float]  # threads → read bytes/s
    cuda: list[CudaRow]
    korean_text: str
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "speed", "results": [r.to_dict() for r in self.results],
                "bandwidth_bytes_s": {str(k): v for k, v in self.bandwidth.items()},
                "cuda": [asdict(c) for c in self.cuda], "korean_text": self.korean_text, "env": self.env}


def measure_bandwidth(n_threads: int = 1, size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth (bytes/s): ``n_threads`` threads each reduce their slice of a buffer far larger than
    the caches (numpy releases the GIL); best of ``repeats``, as STREAM reports."""
    words = np.ones(size_bytes // 8, dtype=np.uint64)
    parts = np.array_split(words, n_threads)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        barrier = threading.Barrier(n_threads + 1)

        def work(a: np.ndarray) -> None:
            barrier.wait()
            np.bitwise_or.reduce(a)

        threads = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return words.nbytes / best


def _time_ns(fn: Callable[[], None]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def bench_pp(model: str | Path | LlamaModel, n_prompt: int = PP_TOKENS, *, repetitions: int = REPETITIONS,
             n_threads: int | None = None, n_gpu_layers: int = 0, n_batch: int = 2048, n_ubatch: int = 512,
             seed: int = 0) -> Rate:
    """llama-bench's pp test: a context of exactly n_prompt, random tokens (BOS first), decoded in n_batch
    batches with only the last logits requested; a warm-up run, then timed runs from an empty cache. ``model`` is a
    file (loaded with ``n_gpu_layers``) or a :class:`LlamaModel`."""
    rng = np.random.default_rng(seed)
    with LlamaRunner(model, n_ctx=n_prompt, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                     n_gpu_layers=n_gpu_layers) as r:
        def run() -> None:
            done = 0
            while done < n_prompt:
                n = min(n_prompt - done, n_batch)
                toks = rng.integers(0, r.n_vocab, size=n)
                if done == 0 and r.add_bos:
                    toks[0] = r.bos
                r.decode(toks, done)
                done += n
            r.synchronize()

        r.clear()
        run()  # warm-up
        samples = []
        for _ in range(repetitions):
            r.clear(data=False)
            samples.append(_time_ns(run))
    return Rate(f"pp{n_prompt}", n_prompt, [n_prompt * 1e9 / ns for ns in samples])


def bench_tg(model: str | Path | LlamaModel, n_gen: int = TG_TOKENS, *, repetitions: int = REPETITIONS,
             n_threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0) -> Rate:
    """llama-bench's tg test: a context of exactly n_gen, one token per decode (BOS, then random ids), logits
    computed for each; a one-token warm-up, then timed runs from an empty cache. ``model`` is a file (loaded with
    ``n_gpu_layers``) or a :class:`LlamaModel`."""
    rng = np.random.default_rng(seed)
    with LlamaRunner(model, n_ctx=n_gen, n_batch=2048, n_threads=n_threads, n_gpu_layers=n_gpu_layers) as r:
        def run(n: int) -> None:
            tok = r.bos if r.add_bos else int(rng.integers(r.n_vocab))
            for pos in range(n):
                r.decode((tok,), pos)
                r.synchronize()
                tok = int(rng.integers(r.n_vocab))

        r.clear()
        run(1)  # warm-up
        samples = []
        for _ in range(repetitions):
            r.clear(data=False)
            samples.append(_time_ns(lambda: run(n_gen)))
    return Rate(f"tg{n_gen}", n_gen, [n_gen * 1e9 / ns for ns in samples])


def korean_chars_per_token(model: str | Path | LlamaModel, text: str) -> float:
    """Characters per token of ``text`` with the file's tokenizer (no BOS): converts tokens/s to characters/s."""
    with LlamaRunner(model, n_ctx=64, n_batch=64, n_threads=1) as r:
        n = len(r.tokenize(text, add_special=False))
    return len(text) / n if n else float("nan")


def speed(files: Sequence[str | Path], *, n_prompt: int = PP_TOKENS, n_gen: int = TG_TOKENS,
          repetitions: int = REPETITIONS, n_threads: Iterable[int] | int | None = None, n_gpu_layers: int = 0,
          text: str | Path | None = None, source: str = "konlpy", bandwidth: bool = True,
          cuda: bool = True, hf: str | None = None, gptq: str | None = None,
          progress: bool = True) -> SpeedReport:
    """llama-bench's pp/tg for every file at every thread count, with Korean characters/s and the roofline."""
    from tqdm.auto import tqdm

    if not files:
        raise KomtError("no GGUF file given: pass one or more files to benchmark")
    if repetitions < 1:
        raise KomtError("--repetitions must be at least 1")
    infos = [file_info(f) for f in files]
    threads = [n_threads] if isinstance(n_threads, int) else list(n_threads or [os.cpu_count() or 1])
    body, described = korean_eval_text(text, source=source)
    sample = body[:20000]
    bw = {t: measure_bandwidth(t) for t in threads} if bandwidth and n_gpu_layers == 0 else {}
    results = []
    with tqdm(total=len(infos) * len(threads) * 2, desc="speed", unit="test", disable=not progress) as bar:
        for info in infos:
            with LlamaModel(info.path, n_gpu_layers=n_gpu_layers) as model:  # one load per file, as llama-bench
                cpt = korean_chars_per_token(model, sample)
                for t in threads:
                    bar.set_postfix_str(f"{info.name} t={t} pp")
                    pp = bench_pp(model, n_prompt, repetitions=repetitions, n_threads=t)
                    bar.update(1)
                    bar.set_postfix_str(f"{info.name} t={t} tg")
                    tg = bench_tg(model, n_gen, repetitions=repetitions, n_threads=t)
                    bar.update(1)
                    backend = "CPU" if n_gpu_layers == 0 else "GPU"
                    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
                    results.append(SpeedResult(info, backend, t, n_gpu_layers, pp, tg, cpt, bw.get(t), load))
    cuda_rows: list[CudaRow] = []
    if cuda:
        from .bench_cuda import cuda_rows as _cuda_rows

        cuda_rows = _cuda_rows([i.path for i in infos], hf=hf, gptq=gptq, n_prompt=n_prompt, n_gen=n_gen,
                               repetitions=repetitions)
    return SpeedReport(results, bw, cuda_rows, described, environment())
