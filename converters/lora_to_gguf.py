"""peft LoRA adapter → llama.cpp's LoRA adapter GGUF (``general.type`` = adapter), from the base's config only.

llama.cpp adds ``scale · B·A·x`` to a weight's output at run time, with ``scale = adapter.lora.alpha / rank`` and
the rank read from each ``lora_b`` tensor. The layout follows llama.cpp's convert_lora_to_gguf.py (read for the
facts, not copied):

- ``<gguf name>.lora_a`` holds A (r × in), ``<gguf name>.lora_b`` holds B (out × r), named with gguf-py's name
  map of the base's architecture;
- the base's q/k rotary permutation permutes the output rows of the weight, so for q_proj/k_proj it is applied to
  B's rows (A is untouched);
- f32/f16/bf16 outputs cast every tensor; q8_0 quantizes with llama.cpp's quantizer the tensors whose rows fill
  whole q8_0 blocks (A, whose rows are the layer's inputs) and writes the others (B, whose rows are r wide) as f16.

Per-module scales that one alpha cannot express (rsLoRA's alpha/√r, ``alpha_pattern``) are folded into B: the
file's alpha is the one most modules need, and each other module's B is multiplied, in float32, by the ratio of
its peft scale to llama.cpp's ``alpha / rank``. ``rank_pattern`` alone needs nothing: llama.cpp reads the rank
per tensor.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from komt_edge.atomic import atomic_file
from komt_edge.errors import KomtError
from komt_edge.merge import Adapter

from . import quantize as q
from .hf_to_gguf import ARCHITECTURES, Hparams, permute_qk

LORA_TYPES = ("f32", "f16", "bf16", "q8_0")
_FLOAT = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}


@dataclass(frozen=True)
class LoraTensor:
    """One adapted weight: its llama.cpp name, peft's A and B, and how B is changed on the way."""
    gguf_name: str  # blk.N.attn_q.weight
    hf_name: str
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    factor: float  # peft scale / llama.cpp's alpha/rank, folded into B (1.0 when they agree)
    permute_heads: int | None  # rotary heads whose rows are permuted (q/k projections), else None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """A and B in float32, as llama.cpp expects them."""
        a, b = self.a.to(torch.float32), self.b.to(torch.float32)  # f16 and bf16 widen exactly
        if self.factor != 1.0:
            b = b * self.factor
        if self.permute_heads is not None:
            b = permute_qk(b, self.permute_heads)
        return np.ascontiguousarray(a.numpy()), np.ascontiguousarray(b.numpy())


def file_alpha(adapter: Adapter) -> float:
    """The one ``adapter.lora.alpha`` llama.cpp reads: the config's lora_alpha when it gives every module peft's
    scale (alpha/r), else the value (scale × rank) that most modules need."""
    alpha = float(adapter.config.get("lora_alpha", adapter.config.get("r", 8)))
    if all(pair.scale == alpha / pair.a.shape[0] for pair in adapter.pairs.values()):
        return alpha
    needed = Counter(pair.scale * pair.a.shape[0] for pair in adapter.pairs.values())
    return needed.most_common(1)[0][0]


class LoraConverter:
    """A loaded peft adapter and the base's config.json → the adapter GGUF. ``__init__`` checks everything."""

    def __init__(self, adapter: Adapter, base_config: dict, base: str | Path):
        self.adapter = adapter
        self.hp = Hparams.from_config(base_config, Path(base))
        if self.hp.gguf_arch != gguf.MODEL_ARCH.LLAMA:
            raise KomtError(f"{base} is a {self.hp.architecture}: komt-edge gguf-lora converts adapters of "
                            f"{', '.join(a for a, g in ARCHITECTURES.items() if g == gguf.MODEL_ARCH.LLAMA)} bases")
        self.alpha = file_alpha(adapter)
        self.tensors = self._plan(base)

    def _plan(self, base: str | Path) -> list[LoraTensor]:
        hp = self.hp
        tmap = gguf.get_tensor_name_map(hp.gguf_arch, hp.n_layer)
        expected = hp.expected_shapes()
        planned = []
        name = self.adapter.folder.name
        for hf_name, pair in self.adapter.pairs.items():
            gname = tmap.get_name(hf_name, try_suffixes=(".weight",))
            if gname is None:
                raise KomtError(f"adapter {name} targets {hf_name}, which a {hp.architecture} does not have: the "
                                f"adapter belongs to another architecture than {base}")
            kind = gname.split(".", 2)[2] if gname.startswith("blk.") else gname
            shape = (int(pair.b.shape[0]), int(pair.a.shape[1]))
            want = expected.get(kind)
            if want is not None and shape != want[0]:
                raise KomtError(f"adapter {name} does not fit {base}: {hf_name} is {shape} in the adapter but "
                                f"{want[0]} ({want[1]}) in the base's config.json; convert it with the base it "
                                f"was trained on ({self.adapter.base_model or 'see adapter_config.json'})")
            heads = hp.n_head if kind == "attn_q.weight" else hp.n_head_kv if kind == "attn_k.weight" else None
            factor = pair.scale / (self.alpha / pair.a.shape[0]) if self.alpha else 1.0
            planned.append(LoraTensor(gname, hf_name, pair.a, pair.b, 1.0 if abs(factor - 1) < 1e-12 else factor,
                                      heads))
        planned.sort(key=lambda t: q.tensor_order_key(t.gguf_name))
        return planned

    @staticmethod
    def tensor_type(qtype: str, n_per_row: int) -> QT:
        """The ggml type of a tensor with rows ``n_per_row`` wide in a ``qtype`` file (q8_0: f16 when the rows
        do not fill whole blocks, as llama.cpp's converter falls back)."""
        if qtype in _FLOAT:
            return _FLOAT[qtype]
        block = gguf.GGML_QUANT_SIZES[QT.Q8_0][0]
        return QT.Q8_0 if n_per_row % block == 0 else QT.F16

    def output_bytes(self, qtype: str) -> int:
        total = 0
        for t in self.tensors:
            for rows, cols in ((t.a.shape[0], t.a.shape[1]), (t.b.shape[0], t.b.shape[1])):
                total += int(rows) * q.row_size(self.tensor_type(qtype, int(cols)), int(cols))
        return total

    def parameter_count(self) -> int:
        return sum(t.a.numel() + t.b.numel() for t in self.tensors)

    def write(self, path: Path, qtype: str, *, name: str, base_models: list[str], tool_version: str,
              progress=None) -> Path:
        """Write the ``qtype`` adapter GGUF to ``path`` atomically."""
        if qtype not in LORA_TYPES:
            raise KomtError(f"--outtype {qtype}: llama.cpp LoRA adapters are {', '.join(LORA_TYPES)}")
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_file(path))
            w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[self.hp.gguf_arch])
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, self.alpha)
            w.add_name(name)
            if base_models:
                w.add_base_model_count(len(base_models))
                for i, repo in enumerate(base_models):
                    w.add_base_model_name(i, repo.split("/")[-1])
                    w.add_base_model_organization(i, repo.split("/")[0] if "/" in repo else "")
                    w.add_base_model_repo_url(i, f"https://huggingface.co/{repo}")
            w.add_file_type(int(q.ftype_of(qtype)))
            if qtype not in _FLOAT:
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_quantized_by(f"komt-edge {tool_version}")
            w.add_string("komt_edge.version", tool_version)
            for t in self.tensors:
                a, b = t.arrays()
                for suffix, data in ((".lora_a", a), (".lora_b", b)):
                    qt = self.tensor_type(qtype, data.shape[-1])
                    encoded = q.quantize(data, qt)
                    w.add_tensor(t.gguf_name + suffix, encoded, raw_dtype=qt)
                if progress:
                    progress(a.size + b.size)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path


def check_lora_fits(lora: Path, base: Path) -> None:
    """Refuse a LoRA adapter GGUF that llama.cpp cannot apply to the model GGUF ``base``: not a LoRA adapter,
    another architecture, a weight the base lacks or of another shape. (The pinned llama-cpp-python does not notice
    when llama.cpp refuses an adapter and then crashes on the first decode, so this is checked first.)"""
    from gguf import GGUFReader

    def field(reader: GGUFReader, key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    try:
        adapter, model = GGUFReader(lora), GGUFReader(base)
    except (OSError, ValueError) as err:
        raise KomtError(f"{lora} or {base} is not a readable GGUF file ({err})") from None
    if field(adapter, "general.type") != "adapter" or field(adapter, "adapter.type") != "lora":
        raise KomtError(f"{lora} is not a LoRA adapter GGUF (general.type {field(adapter, 'general.type')!r}): "
                        "make one with `komt-edge gguf-lora`")
    arch, base_arch = field(adapter, "general.architecture"), field(model, "general.architecture")
    if arch != base_arch:
        raise KomtError(f"{lora.name} is an adapter for {arch}, but {base.name} is a {base_arch} model")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in model.tensors}
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in adapter.tensors}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        weight, b = name[: -len(".lora_a")], tensors.get(name[: -len(".lora_a")] + ".lora_b")
        if weight not in shapes:
            raise KomtError(f"{lora.name} adapts {weight}, which {base.name} does not have: the adapter was made for "
                            "another base; convert it with `komt-edge gguf-lora --base` for this one")
        if b is None or shapes[weight][:2] != (a[0], b[1]) or a[1] != b[0]:
            raise KomtError(f"{lora.name} does not fit {base.name}: {weight} is {shapes[weight][1]}×{shapes[weight][0]} "
                            f"in the base but {'?' if b is None else b[1]}×{a[0]} in the adapter; it was made for "
                            "another base: convert it with `komt-edge gguf-lora --base` for this one")
