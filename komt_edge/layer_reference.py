"""The Hugging Face reference logits of a checkpoint, computed one decoder layer at a time.

:func:`streamed_logits` runs prompts through a causal LM without ever holding the model in memory: resident
memory is one decoder layer's parameters (in the compute dtype), the embedding and output matrices, and the
prompts' hidden states, instead of the whole model (a 7B model in float32: ~29 GB).

1. The model skeleton is built from config.json with transformers' own classes, parameters on the meta device and
   buffers real (rotary ``inv_freq``, Gemma's embedding scale), then cast to the compute dtype as
   ``model.to(dtype)`` casts a loaded model.
2. Only the embedding (and the final norm and lm_head, which may be the tied embedding) are loaded.
3. Each decoder layer is temporarily replaced by a recorder that keeps the exact arguments the model's own forward
   passes it (attention mask, position ids, position embeddings: Gemma 3 passes different ones to its sliding and
   full layers), and the base model runs once per prompt. Masks and rotary come from transformers, not from here.
4. Then, layer by layer: its parameters are read from the memory-mapped checkpoint (:class:`Checkpoint`), the
   LoRA adapter is applied, they are cast to the compute dtype, every prompt's hidden state goes through the layer,
   and the parameters go back to the meta device before the next layer is read.
5. Final norm and lm_head give float32 logits, one ``[tokens, vocab]`` array per prompt.

The adapter, as ``verify`` has always used it:

- ``merge_in_base_dtype=True`` (a merged model, what `komt-edge gguf --adapter` and `komt-edge merge` write):
  each targeted weight is ``merged_weight(base, pair)`` in the checkpoint's own dtype, exactly as the converter
  merges it (``modules_to_save`` tensors replace the base's), and then cast to the compute dtype.
- ``merge_in_base_dtype=False`` (a GGUF base with a llama.cpp LoRA file applied at run time): peft's *unmerged*
  adapter. Each targeted linear layer gets a forward hook computing what peft's ``lora.Linear`` computes in eval:
  ``y = base(x); y = (y + B(A(x.to(A.dtype))) · scale).to(y.dtype)`` with A and B in float32 (peft upcasts
  half-precision adapter weights by default), so the result is peft's unmerged output, operation for operation.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import KomtError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Captured(Exception):
    """Raised by the last layer's recorder: the layers' arguments are known, the rest of the forward is skipped."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the capture pass: records (args, kwargs), returns the input."""

    def __init__(self, index: int, calls: list, last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _Captured
        return hidden_states


@contextlib.contextmanager
def _quiet():
    """No third-party log noise: transformers' and accelerate's warnings, Python warnings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    acc = logging.getLogger("accelerate")
    acc_level = acc.level
    hf_logging.set_verbosity_error()
    acc.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        acc.setLevel(acc_level)


def _auto_dtype(config, ckpt: Checkpoint) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads: config.json's, else the checkpoint's first float's."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    for name in ckpt.names:
        if ckpt.info(name).dtype.is_floating_point:
            return ckpt.info(name).dtype
    return torch.float32


def _skeleton(folder: Path, ckpt: Checkpoint, dtype: torch.dtype, merged: bool) -> nn.Module:
    """The causal LM of ``folder``'s config.json: parameters on the meta device, buffers real.

    The buffers (rotary ``inv_freq``, Gemma's embedding scale) come out as the former whole-model reference had
    them: built in the checkpoint's dtype and cast with ``model.to(dtype)`` for a merged model (``to`` casts
    floating buffers too), built in ``dtype`` for the unmerged adapter (``from_pretrained(dtype=dtype)``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        raise KomtError(f"transformers cannot read {folder}/config.json ({err}): update transformers or "
                        "check the model") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_auto_dtype(config, ckpt) if merged else dtype)
    return (model.to(dtype) if merged else model).eval()


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(base model, its decoder layers, the layers' parameter-name prefix) of a causal LM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise KomtError(f"{type(model).__name__} has no decoder layers where transformers' causal LMs keep them "
                        "(model.layers): the streamed reference does not support this architecture")
    for name, module in model.named_modules():
        if module is layers:
            return base, layers, name
    raise KomtError(f"{type(model).__name__}: cannot locate its decoder layers")


def _set_param(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _to_meta(module: nn.Module) -> None:
    """Free ``module``'s parameters: each becomes a meta tensor of the same shape and dtype."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def materialized_parameters(module: nn.Module) -> int:
    """How many of ``module``'s parameter elements are real (not on the meta device)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen and not p.is_meta:
            seen.add(id(p))
            total += p.numel()
    return total


class _Weights:
    """Parameters from the checkpoint, with the adapter merged (or hooked) and cast to the compute dtype."""

    def __init__(self, ckpt: Checkpoint, adapter, dtype: torch.dtype, merge: bool):
        self.ckpt, self.adapter, self.dtype, self.merge = ckpt, adapter, dtype, merge

    def source_name(self, name: str) -> str:
        if name in self.ckpt:
            return name
        # Checkpoints saved from the multimodal wrapper or without the causal-LM prefix.
        for candidate in (name.removeprefix("model."), "language_model." + name, "model.language_model."
                          + name.removeprefix("model."), "model." + name):
            if candidate in self.ckpt:
                return candidate
        raise KomtError(f"{self.ckpt.folder} has no tensor {name}: the checkpoint does not match its config.json")

    def get(self, name: str) -> torch.Tensor:
        tensor = self.ckpt.get(self.source_name(name))
        if self.adapter is not None:
            if name in self.adapter.replacements:
                tensor = self.adapter.replacements[name].to(tensor.dtype)
            elif self.merge and name in self.adapter.pairs:
                from .merge import merged_weight

                tensor = merged_weight(tensor, self.adapter.pairs[name])  # in the checkpoint's dtype
        return tensor.to(self.dtype)

    def load(self, model: nn.Module, prefix: str, module: nn.Module) -> list:
        """Materialize ``module`` (named ``prefix`` in ``model``); returns the unmerged-LoRA hook handles."""
        for name, _ in list(module.named_parameters()):
            _set_param(module, name, self.get(f"{prefix}.{name}" if prefix else name))
        handles = []
        if self.adapter is not None and not self.merge:
            for name, sub in module.named_modules():
                pair = self.adapter.pairs.get(f"{prefix}.{name}.weight" if name else f"{prefix}.weight")
                if pair is not None:
                    handles.append(sub.register_forward_hook(_lora_hook(pair)))
        return handles


def _lora_hook(pair) -> Callable:
    """peft's unmerged lora.Linear in eval, after the base layer: y + B(A(x)) · scale, back in y's dtype."""
    a = pair.a if pair.a.dtype == torch.float32 else pair.a.to(torch.float32)
    b = pair.b if pair.b.dtype == torch.float32 else pair.b.to(torch.float32)
    scale = pair.scale

    def hook(_module, inputs, output):
        x = inputs[0].to(a.dtype)
        return (output + nn.functional.linear(nn.functional.linear(x, a), b) * scale).to(output.dtype)

    return hook


def streamed_logits(folder: str | Path, prompts_ids: Sequence[Sequence[int]], *, dtype: str = "float32",
                    adapter: str | Path | None = None, merge_in_base_dtype: bool = True, allow_pickle: bool = False,
                    progress: bool = True, loaded_in_dtype: bool = False,
                    on_layer: Callable[[int, nn.Module], None] | None = None) -> list[np.ndarray]:
    """Logits of the HF model in ``folder`` (+ LoRA ``adapter``) for each prompt, one decoder layer at a time.

    ``prompts_ids``: token ids per prompt. ``dtype``: the compute precision (float32, bfloat16, float16).
    ``merge_in_base_dtype``: merge the adapter in the checkpoint's dtype (the converted model), or apply it
    unmerged as peft does (see the module docstring). ``loaded_in_dtype``: the model as
    ``from_pretrained(dtype=dtype)`` builds it (its buffers computed in ``dtype``), rather than loaded in the
    checkpoint's dtype and cast with ``.to(dtype)`` (verify's merged reference). ``on_layer(i, model)`` is called while layer ``i`` is
    materialized, before it runs (tests count the real parameters there). Returns one float32 ``[tokens, vocab]``
    array per prompt."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise KomtError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    folder = Path(folder)
    prompts = [list(map(int, ids)) for ids in prompts_ids]
    if not prompts or any(not ids for ids in prompts):
        raise KomtError("streamed_logits needs at least one prompt, each with at least one token")
    ckpt = Checkpoint(folder, allow_pickle=allow_pickle)
    qcfg = ckpt.config.get("quantization_config") or {}
    if qcfg:
        raise KomtError(f"{folder} is a quantized checkpoint ({qcfg.get('quant_method', 'unknown')}): the reference "
                        "is the full-precision model it was made from; pass that one")
    lora = None
    if adapter is not None:
        from .merge import check_compatible, load_adapter

        lora = load_adapter(Path(adapter), allow_pickle=allow_pickle)
        check_compatible(ckpt, lora, folder)
    weights = _Weights(ckpt, lora, torch_dtype, merge_in_base_dtype)

    with _quiet(), torch.inference_mode():
        model = _skeleton(folder, ckpt, torch_dtype,
                          merged=not loaded_in_dtype and (lora is None or merge_in_base_dtype))
        base, layers, layers_prefix = _decoder_layers(model)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        tied = head.weight is embed.weight or bool(getattr(text_config, "tie_word_embeddings", False))
        weights.load(model, names[id(embed)], embed)
        if tied:
            head.weight = embed.weight

        # Capture: each layer's arguments per prompt, from the model's own forward.
        originals = list(layers)
        calls: list = []
        for i in range(len(layers)):
            layers[i] = _Recorder(i, calls, last=i == len(layers) - 1)
        states, layer_args = [], []
        try:
            for ids in prompts:
                calls.clear()
                try:
                    base(input_ids=torch.tensor([ids]), use_cache=False)
                except _Captured:
                    pass
                if [c[0] for c in calls] != list(range(len(layers))):
                    raise KomtError(f"{type(model).__name__}'s forward did not call its decoder layers in order: "
                                    "the streamed reference does not support this architecture")
                states.append(calls[0][1])
                layer_args.append([(args, kwargs) for _, _, args, kwargs in calls])
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            calls.clear()
        if not tied:
            _to_meta(embed)  # the hidden states are computed: the input embedding is no longer needed

        # One layer at a time.
        for i in tqdm(range(len(layers)), desc="reference", unit="layer", disable=not progress, leave=False):
            layer = layers[i]
            handles = weights.load(model, f"{layers_prefix}.{i}", layer)
            try:
                if on_layer is not None:
                    on_layer(i, model)
                for p in range(len(prompts)):
                    args, kwargs = layer_args[p][i]
                    out = layer(states[p], *args, **kwargs)
                    states[p] = out[0] if isinstance(out, (tuple, list)) else out
            finally:
                for handle in handles:
                    handle.remove()
                _to_meta(layer)
        del layer_args

        # Final norm and the output head.
        norm = getattr(base, "norm", None)
        if norm is None:
            raise KomtError(f"{type(model).__name__} has no final norm at model.norm: not supported")
        weights.load(model, names[id(norm)], norm)
        if not tied:
            weights.load(model, names[id(head)], head)
        logits = []
        for state in states:
            out = head(norm(state))
            # Gemma 2/3 style final logit soft-capping, as the causal LM's forward applies it.
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                out = torch.tanh(out / cap) * cap
            logits.append(out[0].to(torch.float32).numpy())
        del model
    return logits


def whole_model_logits(folder: str | Path, prompts_ids: Sequence[Sequence[int]], *, dtype: str = "float32",
                       adapter: str | Path | None = None, merge: bool = True) -> list[np.ndarray]:
    """The former reference: the whole model in memory (``from_pretrained``, peft). For tests and benchmarks
    only, as the yardstick of :func:`streamed_logits`; ``verify`` uses the streamed one.

    With ``merge`` the adapter is merged by peft (``merge_and_unload``) in the checkpoint's dtype, then the model
    is cast to ``dtype``; without, it is peft's unmerged adapter on the base loaded in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    with _quiet():
        if adapter is not None and not merge:
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype),
                                              adapter).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            model = model.to(torch_dtype).eval()
        with torch.inference_mode():
            return [model(torch.tensor([list(ids)])).logits[0].to(torch.float32).numpy() for ids in prompts_ids]
