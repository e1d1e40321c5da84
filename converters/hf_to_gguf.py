"""Hugging Face checkpoint → GGUF, streaming, every requested type from one read of the checkpoint.

Layout and conventions are llama.cpp's (learned from convert_hf_to_gguf.py and llama-quantize, not copied):

- tensor names come from gguf-py's name map for the architecture;
- llama (Llama 2/3, Mistral): ``q_proj``/``k_proj`` rows (and their biases) are permuted into llama.cpp's rotary
  layout (pairs → halves per head); Llama 3.1's rope scaling (``rope_type: llama3``) becomes the per-frequency
  factors tensor ``rope_freqs.weight``, which llama.cpp computes at conversion rather than at run time;
- Qwen2/2.5 (``qwen2``): NeoX rotary, so no permutation; the q/k/v biases are written as F32 tensors;
- Gemma 3 (``gemma3``): no permutation (NeoX rotary), every RMSNorm weight stored as ``1 + w`` (Gemma's norms
  multiply by ``1 + w``; llama.cpp's by ``w``), the tied embedding cut to the tokenizer's vocabulary, both rope
  bases (global and sliding-window layers) and the sliding window written, and the local/global layer pattern
  when config.layer_types differs from the 5:1 that llama.cpp assumes;
- 1-D tensors and norms stay F32; 2-D weights take the output type;
- quantized outputs use llama-quantize's per-tensor mix with the plan's per-tensor types (converters.plan),
  computed by llama.cpp itself (converters.quantize), and tensors are written in llama.cpp's order, so the k-quant mixes count layers the same way.

Each tensor is read once and quantized for every output file in one pass, on all cores through llama.cpp's
quantizer, widened to float32 a cache-sized block at a time (converters.quantize.quantize_all). Reading,
quantizing and writing overlap in a bounded pipeline (komt_edge.tensor_pipeline): tensor i+1 is read while tensor i is
quantized and tensor i-1 written, a few tensors in memory at a time.
Outputs are written to temporary names and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from komt_edge.atomic import atomic_file
from komt_edge.checkpoint import Checkpoint
from komt_edge.errors import KomtError
from komt_edge.merge import check_compatible, load_adapter, merged_weight
from komt_edge.tensor_pipeline import BufferPool, run_pipeline

from . import quantize as q
from .architectures import ARCHITECTURES as FAMILIES
from .plan import QuantPlan
from .vocab import Vocab, load_vocab

# HF architectures this converter handles, and the GGUF architecture each is written as (the family table,
# converters/architectures.py, that every other list of families derives from).
_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {a.name: _ARCH_BY_NAME[a.gguf_arch] for a in FAMILIES}

# HF tensors that carry no weights llama.cpp needs.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Metadata:
    """general.* and provenance written into every output file."""
    name: str
    basename: str | None = None
    size_label: str | None = None
    license: str | None = None
    base_models: list[str] = field(default_factory=list)  # Hub ids
    source_repo: str | None = None
    source_revision: str | None = None
    chat_template: str | None = None
    quantized_by: str = "komt-edge"
    tool_version: str = ""


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    permute_heads: int | None  # number of heads to permute rows for (q/k projections), else None
    generated: np.ndarray | None = None  # a tensor computed from config.json (rope_freqs.weight), not read


@dataclass
class Hparams:
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float | None
    rope_scaling: dict | None
    vocab_size: int
    tie_embeddings: bool
    head_dim_in_config: bool = True  # llama.cpp writes key/value_length only when config.json gives head_dim
    # gemma3 only
    rope_theta_swa: float | None = None
    sliding_window: int | None = None
    swa_layers: list[bool] | None = None  # per layer: sliding-window attention (config.layer_types)
    final_logit_softcapping: float | None = None

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return ARCHITECTURES[self.architecture]

    @property
    def is_gemma3(self) -> bool:
        return self.gguf_arch == gguf.MODEL_ARCH.GEMMA3

    @property
    def is_llama(self) -> bool:
        return self.gguf_arch == gguf.MODEL_ARCH.LLAMA

    @property
    def rope_type(self) -> str | None:
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        return kind.lower() if isinstance(kind, str) else None

    def rope_factors(self) -> np.ndarray | None:
        """Llama 3.1's rope scaling as llama.cpp stores it: one factor per rotary frequency (``rope_freqs.weight``),
        float32 arithmetic as in the converter: 1 for high frequencies, ``factor`` for low ones, a smooth blend
        between the two wavelengths set by ``low_freq_factor`` and ``high_freq_factor``."""
        if self.rope_type != "llama3":
            return None
        import math

        sc = self.rope_scaling
        base = float(sc.get("rope_theta", self.rope_theta or 10000.0))
        factor, low, high = (float(sc.get(k, d)) for k, d in (("factor", 8.0), ("low_freq_factor", 1.0),
                                                                ("high_freq_factor", 4.0)))
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        freqs = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = 1 / ((1 - smooth) / factor + smooth)
        out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs),
                          torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), blended))
        return out.numpy()

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The shape config.json implies for each kind of tensor (``attn_q.weight``, ``ffn_down.weight``, ...),
        in the HF layout [out_features, in_features], with the config keys that give it."""
        hp = self
        q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        return {  # HF layout: [out_features, in_features]
            "attn_q.weight": ((q_rows, hp.n_embd), "num_attention_heads × head_dim, hidden_size"),
            "attn_k.weight": ((kv_rows, hp.n_embd), "num_key_value_heads × head_dim, hidden_size"),
            "attn_v.weight": ((kv_rows, hp.n_embd), "num_key_value_heads × head_dim, hidden_size"),
            "attn_output.weight": ((hp.n_embd, q_rows), "hidden_size, num_attention_heads × head_dim"),
            "ffn_gate.weight": ((hp.n_ff, hp.n_embd), "intermediate_size, hidden_size"),
            "ffn_up.weight": ((hp.n_ff, hp.n_embd), "intermediate_size, hidden_size"),
            "ffn_down.weight": ((hp.n_embd, hp.n_ff), "hidden_size, intermediate_size"),
            "attn_norm.weight": ((hp.n_embd,), "hidden_size"),
            "ffn_norm.weight": ((hp.n_embd,), "hidden_size"),
            "post_attention_norm.weight": ((hp.n_embd,), "hidden_size"),
            "post_ffw_norm.weight": ((hp.n_embd,), "hidden_size"),
            "attn_q.bias": ((q_rows,), "num_attention_heads × head_dim"),
            "attn_k.bias": ((kv_rows,), "num_key_value_heads × head_dim"),
            "attn_v.bias": ((kv_rows,), "num_key_value_heads × head_dim"),
            "attn_q_norm.weight": ((hp.head_dim,), "head_dim"),
            "attn_k_norm.weight": ((hp.head_dim,), "head_dim"),
            "output_norm.weight": ((hp.n_embd,), "hidden_size"),
            "output.weight": ((hp.vocab_size, hp.n_embd), "vocab_size, hidden_size"),
        }

    @classmethod
    def from_config(cls, cfg: dict, folder: Path) -> "Hparams":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "unknown")
        if arch not in ARCHITECTURES:
            raise KomtError(f"unsupported architecture {arch!r} in {folder}/config.json: komt-edge converts "
                            f"{', '.join(ARCHITECTURES)}")
        if ARCHITECTURES[arch] == gguf.MODEL_ARCH.GEMMA3:
            return cls._gemma3(cfg, folder, arch)
        try:
            n_head = int(cfg["num_attention_heads"])
            n_embd = int(cfg["hidden_size"])
            scaling = cfg.get("rope_parameters", cfg.get("rope_scaling")) or None
            return cls(
                architecture=arch,
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_ctx=int(cfg.get("max_position_embeddings") or 4096),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(cfg),
                rope_scaling=scaling,
                vocab_size=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim_in_config=cfg.get("head_dim") is not None,
            )
        except KeyError as err:
            raise KomtError(f"{folder}/config.json lacks {err.args[0]!r}: it is not a complete "
                            f"{arch} config") from None

    @classmethod
    def _gemma3(cls, cfg: dict, folder: Path, arch: str) -> "Hparams":
        """Gemma 3 text config, with the defaults llama.cpp's converter assumes for keys a config may omit."""
        rope = cfg.get("rope_parameters") or {}
        full = rope.get("full_attention", rope)
        theta = full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        theta_swa = (rope.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq"))
        scaling = dict(full) if full.get("rope_type") not in (None, "default") else cfg.get("rope_scaling")
        try:
            return cls(
                architecture=arch,
                n_layer=int(cfg["num_hidden_layers"]),
                n_embd=int(cfg["hidden_size"]),
                n_ff=int(cfg["intermediate_size"]),
                n_head=int(cfg.get("num_attention_heads", 8)),
                n_head_kv=int(cfg.get("num_key_value_heads", 4)),
                head_dim=int(cfg.get("head_dim", 256)),
                n_ctx=int(cfg.get("max_position_embeddings", 131072)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                vocab_size=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                rope_theta_swa=float(theta_swa) if theta_swa is not None else None,
                sliding_window=(int(cfg["sliding_window"]) if cfg.get("sliding_window_pattern") != 1
                                and cfg.get("sliding_window") is not None else None),
                swa_layers=([t == "sliding_attention" for t in cfg["layer_types"]]
                            if isinstance(cfg.get("layer_types"), list) else None),
                final_logit_softcapping=cfg.get("final_logit_softcapping") or None,
            )
        except KeyError as err:
            raise KomtError(f"{folder}/config.json lacks {err.args[0]!r}: it is not a complete "
                            f"{arch} config") from None

    def model_shape(self) -> q.ModelShape:
        return q.ModelShape(gguf.MODEL_ARCH_NAMES[self.gguf_arch], self.n_embd, self.n_ff, self.n_layer, self.n_head, self.n_head_kv,
                            self.head_dim)


def _rope_theta(cfg: dict) -> float | None:
    """rope_theta, at the top level (transformers 4) or under rope_parameters (transformers 5)."""
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    return float(theta) if theta is not None else None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores rotary pairs interleaved per head; llama.cpp expects them as two halves."""
    return _permuted_view(w, n_head).reshape(w.shape)


def _permuted_view(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """permute_qk without the copy: a 4-D strided view whose row-major order is permute_qk(w)'s."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)


class Converter:
    """One model folder → one or more GGUF files. ``plan()`` checks everything before anything is written."""

    def __init__(self, folder: Path, *, adapter: Path | None = None, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.ckpt = Checkpoint(self.folder, allow_pickle=allow_pickle)
        # A LoRA adapter is merged tensor by tensor while reading: no merged copy of the model on disk.
        self.adapter = load_adapter(adapter, allow_pickle=allow_pickle) if adapter else None
        if self.adapter:
            check_compatible(self.ckpt, self.adapter, self.folder)
        self.hp = Hparams.from_config(self.ckpt.config, self.folder)
        self.vocab: Vocab = load_vocab(self.folder, self.hp.vocab_size, space_prefix_flag=self.hp.is_llama)
        self.tensors = self._plan_tensors()
        self._types: dict[tuple, list[QT]] = {}  # by the plan's base type and per-tensor types

    @property
    def warnings(self) -> list[str]:
        """What the user should know about the input (tokenizer fix-ups, ignored adapter settings)."""
        return [*self.vocab.warnings, *(self.adapter.warnings if self.adapter else [])]

    # -- planning ----------------------------------------------------------------------------------
    def _plan_tensors(self) -> list[_Planned]:
        hp = self.hp
        tmap = gguf.get_tensor_name_map(ARCHITECTURES[hp.architecture], hp.n_layer)
        planned: list[_Planned] = []
        for hf_name in self.ckpt.names:
            if hf_name.endswith(_SKIP_SUFFIXES):
                continue
            if hp.is_gemma3 and hf_name == "lm_head.weight" and hp.tie_embeddings:
                continue  # tied to the embedding, which llama.cpp uses as the output
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise KomtError(f"tensor {hf_name!r} in {self.folder} has no llama.cpp counterpart: "
                                f"the checkpoint is not a plain {hp.architecture}")
            shape = self.ckpt.info(hf_name).shape
            heads = None
            if hp.is_gemma3:
                if gname == "token_embd.weight" and shape[0] > len(self.vocab.tokens):
                    shape = (len(self.vocab.tokens), *shape[1:])  # rows past the tokenizer's vocabulary dropped
            elif hp.is_llama and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = hp.n_head
            elif hp.is_llama and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = hp.n_head_kv
            planned.append(_Planned(gname, hf_name, shape, heads))
            self._check_shape(gname, hf_name, shape)
        factors = hp.rope_factors()
        if factors is not None:
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            planned.append(_Planned(name, "", factors.shape, None, generated=factors))
        names = {p.gguf_name for p in planned}
        if "token_embd.weight" not in names:
            raise KomtError(f"{self.folder} has no token embedding (model.embed_tokens.weight): incomplete checkpoint")
        missing = [f"blk.{i}.attn_q.weight" for i in range(hp.n_layer) if f"blk.{i}.attn_q.weight" not in names]
        if missing:
            raise KomtError(f"{self.folder} lacks {missing[0]} (and {len(missing) - 1} more): incomplete checkpoint")
        emb = next(p for p in planned if p.gguf_name == "token_embd.weight")
        if emb.shape[0] != (len(self.vocab.tokens) if hp.is_gemma3 else hp.vocab_size):
            raise KomtError(f"token embedding has {emb.shape[0]} rows but config.json says vocab_size="
                            f"{hp.vocab_size}: fix config.json")
        planned.sort(key=lambda p: q.tensor_order_key(p.gguf_name))
        return planned

    def _check_shape(self, gguf_name: str, hf_name: str, shape: tuple[int, ...]) -> None:
        """A weight whose shape disagrees with config.json makes a file llama.cpp refuses to load: stop here."""
        hp = self.hp
        expected = hp.expected_shapes()
        kind = gguf_name.split(".", 2)[2] if gguf_name.startswith("blk.") else gguf_name
        want = expected.get(kind)
        if gguf_name == "token_embd.weight":
            want = ((shape[0], hp.n_embd), "vocab_size, hidden_size")  # rows are checked against the vocabulary
        if want is not None and tuple(shape) != want[0]:
            raise KomtError(f"tensor {hf_name} is {tuple(shape)} but {self.folder}/config.json implies {want[0]} "
                            f"({want[1]}): the weights and config.json do not belong together; fix config.json or "
                            "re-download the model")

    def _source_type(self, p: _Planned) -> QT:
        if len(p.shape) <= 1 or p.gguf_name.endswith("_norm.weight") or p.generated is not None:
            return QT.F32
        return {torch.float16: QT.F16, torch.bfloat16: QT.BF16}.get(self.ckpt.info(p.hf_name).dtype, QT.F32)

    def types_for(self, plan: QuantPlan | str, *, imatrix: bool | None = None) -> list[QT]:
        """The ggml type of every planned tensor in the file of ``plan`` (a QuantPlan, or a type name for llama.cpp's
        own mix): llama-quantize's mix without an imatrix, with the plan's per-tensor types. Types that llama.cpp
        only quantizes with an importance matrix are refused unless ``imatrix`` (default: the plan uses one)."""
        plan = q.as_plan(plan)
        imatrix = plan.imatrix is not None if imatrix is None else imatrix
        key = (plan.base, plan.tensor_types)
        if key not in self._types:
            self._types[key] = self._compute_types(plan)
        types = self._types[key]
        needs = sorted({t.name for p, t in zip(self.tensors, types) if q.requires_imatrix(p.gguf_name, t, plan.base)})
        if needs and not imatrix:
            raise KomtError(f"{plan.key} needs an importance matrix for its {', '.join(needs)} tensors: pass "
                            "--imatrix korean (or an imatrix file), or choose a type such as q4_K_M")
        return types

    def _compute_types(self, plan: QuantPlan) -> list[QT]:
        if plan.is_float:
            target = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}[plan.base]
            return [QT.F32 if len(p.shape) <= 1 or p.gguf_name.endswith("_norm.weight") else target
                    for p in self.tensors]
        specs = [q.TensorSpec(p.gguf_name, p.shape, self._source_type(p)) for p in self.tensors]
        return q.compute_types(self.hp.model_shape(), specs, plan)

    def lossless_type(self) -> str:
        """The float output that holds every weight exactly: the checkpoint's own precision when all its
        matrices share it (bf16, f16), else f32. Quantizing from it gives the bytes quantizing in float32 gives."""
        kinds = {self._source_type(p) for p in self.tensors
                 if len(p.shape) > 1 and not p.gguf_name.endswith("_norm.weight")}
        return {frozenset({QT.BF16}): "bf16", frozenset({QT.F16}): "f16"}.get(frozenset(kinds), "f32")

    def output_bytes(self, plan: QuantPlan | str, *, imatrix: bool | None = None) -> int:
        """The tensor data of the ``plan`` file (the metadata adds well under a megabyte)."""
        return sum(_nbytes(p.shape, t) for p, t in zip(self.tensors, self.types_for(plan, imatrix=imatrix)))

    def parameter_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.tensors)

    # -- writing -----------------------------------------------------------------------------------
    def _writer(self, path: Path, plan: QuantPlan, meta: Metadata, types: list[QT]) -> gguf.GGUFWriter:
        hp = self.hp
        w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[hp.gguf_arch])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(meta.name)
        if meta.basename:
            w.add_basename(meta.basename)
        if meta.size_label:
            w.add_size_label(meta.size_label)
        if meta.license:
            w.add_license(meta.license)
        if meta.base_models:
            w.add_base_model_count(len(meta.base_models))
            for i, repo in enumerate(meta.base_models):
                w.add_base_model_name(i, repo.split("/")[-1])
                w.add_base_model_organization(i, repo.split("/")[0] if "/" in repo else "")
                w.add_base_model_repo_url(i, f"https://huggingface.co/{repo}")
        if meta.source_repo:
            w.add_source_repo_url(f"https://huggingface.co/{meta.source_repo}")
            w.add_string("komt_edge.source.repo", meta.source_repo)
        if meta.source_revision:
            w.add_string("komt_edge.source.revision", meta.source_revision)
        w.add_quantized_by(meta.quantized_by)
        w.add_string("komt_edge.version", meta.tool_version)

        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        if hp.rope_theta is not None:
            w.add_rope_freq_base(hp.rope_theta)
        self._write_rope_scaling(w)
        if hp.is_gemma3:
            if hp.rope_theta_swa is not None:
                w.add_rope_freq_base_swa(hp.rope_theta_swa)
            if hp.sliding_window is not None:
                w.add_sliding_window(hp.sliding_window)
                # llama.cpp assumes Gemma 3's 5 local : 1 global layers unless told; convert_hf_to_gguf.py never
                # tells, so a config with other layer_types would run wrong. Written only when it differs.
                default = [il % 6 < 5 for il in range(hp.n_layer)]
                if hp.swa_layers is not None and hp.swa_layers != default:
                    w.add_sliding_window_pattern(hp.swa_layers)
            if hp.final_logit_softcapping:
                w.add_final_logit_softcapping(float(hp.final_logit_softcapping))
        elif hp.is_llama:
            w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim_in_config or hp.is_gemma3:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        if not hp.gguf_arch == gguf.MODEL_ARCH.QWEN2:  # llama.cpp's qwen2 converter writes no vocab_size
            w.add_vocab_size(len(self.vocab.tokens))
        w.add_file_type(int(plan.ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # float files too, as llama.cpp's converter writes it

        self.vocab.write(w)
        if meta.chat_template:
            w.add_chat_template(meta.chat_template)

        for p, t in zip(self.tensors, types):
            nbytes = _nbytes(p.shape, t)
            w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        return w

    def _write_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        """Rope scaling keys, for the kinds llama.cpp's converter writes as keys: linear and YaRN (Qwen2.5's long
        context), the type alone for LongRoPE. Llama 3's kind is the rope_freqs.weight tensor instead."""
        sc, kind = self.hp.rope_scaling or {}, self.hp.rope_type
        factor = sc.get("factor")
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(sc["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                value = sc.get(key, sc.get("attn_factor") if key == "attention_factor" else None)
                if value is not None:
                    add(value)
        elif kind in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)

    def read_source(self, p: _Planned, buffers: BufferPool | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tensor ``p`` as written, before widening: merged with the adapter, in the checkpoint's dtype, permuted as
        a strided view (``_permuted_view``, no copy); and the tensors behind it that came from ``buffers``, to give
        back once it is quantized. ``quantize.quantize_all`` widens it to float32 a cache-sized block at a time."""
        if p.generated is not None:
            return torch.from_numpy(p.generated), []
        # With buffers, the bytes are read (pread, into a recycled buffer) rather than memory-mapped: no page
        # fault per 4 KiB of the checkpoint.
        t = raw = self.ckpt.read(p.hf_name, buffers) if buffers is not None else self.ckpt.get(p.hf_name)
        merged = None
        if self.adapter is not None:
            if p.hf_name in self.adapter.pairs:  # same arithmetic as `komt-edge merge`, so identical bytes
                t = merged = merged_weight(t, self.adapter.pairs[p.hf_name], buffers)
            elif p.hf_name in self.adapter.replacements:
                t = self.adapter.replacements[p.hf_name].to(t.dtype)
        if self.hp.is_gemma3:
            if p.gguf_name == "token_embd.weight":
                t = t[: p.shape[0]]
            if p.hf_name.endswith("norm.weight"):
                t = t.to(torch.float32) + 1  # in float32, as convert_hf_to_gguf.py does
        view = t if p.permute_heads is None else _permuted_view(t, p.permute_heads)
        owned = list({id(x): x for x in (raw, merged) if x is not None}.values()) if buffers is not None else []
        return view, owned

    @staticmethod
    def encode(source: torch.Tensor, types: list[QT], pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
        """``source`` (from ``read_source``) in each of ``types``: the bytes to write, widened exactly and
        quantized by llama.cpp, one pass over it for all the types."""
        if source.dtype == torch.bfloat16:
            return q.quantize_all(source.view(torch.int16).numpy().view(np.uint16), types, pool, bf16=True)
        if source.dtype not in (torch.float32, torch.float16):
            source = source.to(torch.float32)
        return q.quantize_all(source.numpy(), types, pool)

    def write(self, outputs: dict[QuantPlan | str, Path], meta: Metadata, *, n_threads: int | None = None,
              progress: Callable[[int], None] | None = None) -> dict[QuantPlan, Path]:
        """Write every output (plan → path; a type name means llama.cpp's own mix) from one pass over the
        checkpoint; returns {plan: final path}. A plan with an importance matrix is quantized by llama.cpp from a
        float file instead (``quantize.quantize_file``)."""
        outputs = {q.as_plan(k): Path(v) for k, v in outputs.items()}
        if any(plan.imatrix is not None for plan in outputs):
            raise ValueError("plans with an importance matrix are quantized with quantize.quantize_file")
        plans = {plan: self.types_for(plan) for plan in outputs}  # fails early, before any file exists
        n_threads = n_threads or os.cpu_count() or 1
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(n_threads) as pool:
            writers = {}
            for plan, final in outputs.items():
                tmp = stack.enter_context(atomic_file(final))
                w = self._writer(tmp, plan, meta, plans[plan])
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                writers[plan] = w
            # A bounded pipeline: tensor i+1 is read (and merged) while tensor i is widened and quantized for every
            # output on all cores, a cache-sized block at a time, and tensor i-1 is written to every file. Same
            # order, same bytes.
            buffers = BufferPool(keep=2)

            def read():
                for i, p in enumerate(self.tensors):
                    yield i, p, *self.read_source(p, buffers)

            def encode(item):
                i, p, source, owned = item
                arrays = self.encode(source, [plans[plan][i] for plan in writers], pool)
                encoded = list(zip(writers.values(), arrays))
                # a buffer an output still points into (an F32 output of F32 weights) goes back once written
                kept, done = [], []
                for b in owned:
                    raw = b.view(torch.uint8).numpy()
                    (kept if any(np.may_share_memory(arr, raw) for arr in arrays) else done).append(b)
                for b in done:
                    buffers.give(b)
                return p, encoded, kept

            def write(result):
                p, encoded, kept = result
                for w, arr in encoded:
                    w.write_tensor_data(arr.reshape(-1) if arr.dtype == np.uint8 else arr)
                for b in kept:
                    buffers.give(b)
                if progress:
                    progress(int(np.prod(p.shape)))

            run_pipeline(read(), encode, write, read_ahead=1, write_behind=2, name="gguf")
            for w in writers.values():
                w.close()
        return outputs


def _nbytes(shape: tuple[int, ...], t: QT) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if t == QT.F32:
        return rows * shape[-1] * 4
    if t in (QT.F16, QT.BF16):
        return rows * shape[-1] * 2
    return rows * q.row_size(t, shape[-1])
