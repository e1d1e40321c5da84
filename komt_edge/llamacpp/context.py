"""One llama.cpp model and one context on it, through llama.cpp's C API (llama-cpp-python's bindings), driven the
way llama-bench and llama-perplexity drive it: :class:`LlamaModel` is a loaded file, :class:`LlamaRunner` a context
(tokenize, decode batches, read logits; nothing is sampled). bench (speed, quality) and the imatrix use them."""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Self, Sequence

import numpy as np

from ..converters.gguf_file import check_model_gguf
from ..errors import KomtError, raise_pending
from .log import load_errors, reason, route_llama_log


# ---------------------------------------------------------------------------------------------------
# The library, loaded once, with its log quieted.
# ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def library():
    import llama_cpp

    llama_cpp.llama_backend_init()
    route_llama_log()  # errors only: warnings such as the SWA-cache notice would drown the tables
    return llama_cpp


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (the PyPI sdist build is CPU-only)."""
    return bool(library().llama_supports_gpu_offload())


# ---------------------------------------------------------------------------------------------------
# Models and contexts.
# ---------------------------------------------------------------------------------------------------

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
        llama_cpp = library()
        path = Path(path)
        check_model_gguf(path, "a GGUF FILE")
        self.path = path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._lib = llama_cpp
        with load_errors() as errors:
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        raise_pending()  # a signal that arrived in llama.cpp's log callback while the model loaded
        if not self.model:
            raise KomtError(f"llama.cpp could not load {path}: " + (reason(errors) or "the file is damaged, not a "
                            "model, or of an architecture this llama.cpp does not know"))

    def close(self) -> None:
        if getattr(self, "model", None):
            self._lib.llama_model_free(self.model)
            self.model = None


class LlamaRunner(_Closing):
    """One llama.cpp context: tokenize, decode batches, read logits; nothing sampled. ``model`` is a file (loaded
    with ``n_gpu_layers`` and freed with the runner) or a :class:`LlamaModel` the caller keeps."""

    def __init__(self, model: str | Path | LlamaModel, *, n_ctx: int, n_batch: int | None = None,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: str = "auto", cb_eval=None):
        llama_cpp = library()
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
        if cb_eval is not None:  # the scheduler's eval callback (ggml_backend_sched_eval_callback): imatrix
            cparams.cb_eval = cb_eval
            cparams.cb_eval_user_data = None
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
        raise_pending()  # a signal that arrived in a callback (the imatrix collector's, the log's) ends the run
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
# llama-bench's timed tests.
# ---------------------------------------------------------------------------------------------------
