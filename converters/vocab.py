"""Tokenizer → GGUF vocabulary: SentencePiece ``tokenizer.model`` (komt, Llama-2, Mistral) and byte-level BPE
``tokenizer.json`` (Llama 3, Qwen2/2.5, SmolLM2 and other GPT-2 style vocabularies).

Byte-level BPE is read as llama.cpp's converter reads it: through the model's own Hugging Face tokenizer (the
vocabulary padded to config.json's vocab_size, added tokens as control or user-defined tokens), the pre-tokenizer
named by the fingerprint of its output (converters.bpe_pre), and merges and special tokens from gguf-py.

komt quirks handled here:
- the ``[PAD]`` token komt adds at id 32000 (added_tokens.json / tokenizer.json) becomes the padding token;
- komt's special_tokens_map maps bos, eos and unk all to ``</s>``: llama.cpp needs the ids the SentencePiece
  model defines (bos 1, eos 2, unk 0), so those are written and the disagreement is reported as a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFWriter, TokenType

from komt_edge.errors import KomtError


@dataclass
class Vocab:
    model: str  # GGUF tokenizer model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None
    warnings: list[str] = field(default_factory=list)
    # byte-level BPE: the special-token ids and add_*_token flags by role (bos, eos, pad, sep, ...), written as
    # they are instead of the fields above, only the roles the tokenizer defines
    role_ids: dict[str, int] | None = None
    role_adds: dict[str, bool] | None = None

    def write(self, w: GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        if self.role_ids is not None:
            for role, tid in self.role_ids.items():
                getattr(w, f"add_{role}_token_id")(tid)
            for role, flag in (self.role_adds or {}).items():
                getattr(w, f"add_add_{role}_token")(flag)
        else:
            for setter, value in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                                  (w.add_unk_token_id, self.unk_id), (w.add_pad_token_id, self.pad_id)):
                if value is not None:
                    setter(value)
            w.add_add_bos_token(self.add_bos)
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KomtError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): fix or re-download it") from None


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id → (content, special) from tokenizer.json, tokenizer_config.json and added_tokens.json."""
    added: dict[int, tuple[str, bool]] = {}
    for tok in _read_json(folder / "tokenizer.json").get("added_tokens", []):
        added[int(tok["id"])] = (tok["content"], bool(tok.get("special", False)))
    for idx, tok in (_read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        added.setdefault(int(idx), (tok["content"], bool(tok.get("special", False))))
    for content, idx in _read_json(folder / "added_tokens.json").items():
        added.setdefault(int(idx), (content, False))
    return added


def load_vocab(folder: Path, vocab_size: int, *, space_prefix_flag: bool = True) -> Vocab:
    """The vocabulary of the tokenizer in ``folder``, padded to ``vocab_size``. ``space_prefix_flag``: whether a
    byte-level BPE tokenizer_config's add_prefix_space is written (llama.cpp writes it for the llama architecture
    only)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(folder, vocab_size)
        _apply_config_flags(folder, vocab)
    elif (folder / "tokenizer.json").is_file():
        vocab = _bpe_vocab(folder, vocab_size)
        prefix = _read_json(folder / "tokenizer_config.json").get("add_prefix_space")
        if space_prefix_flag and prefix is not None:
            vocab.add_space_prefix = bool(prefix)
    else:
        raise KomtError(f"no tokenizer in {folder}: expected tokenizer.model (SentencePiece) or tokenizer.json; "
                        "copy the tokenizer files of the base model into the folder")
    return vocab


def _apply_config_flags(folder: Path, vocab: Vocab) -> None:
    cfg = _read_json(folder / "tokenizer_config.json")
    if isinstance(cfg.get("add_bos_token"), bool):
        vocab.add_bos = cfg["add_bos_token"]
    if isinstance(cfg.get("add_eos_token"), bool):
        vocab.add_eos = cfg["add_eos_token"]
    if isinstance(cfg.get("add_prefix_space"), bool):
        vocab.add_space_prefix = cfg["add_prefix_space"]


def _pad_to(vocab: Vocab, vocab_size: int, folder: Path) -> None:
    n = len(vocab.tokens)
    if n > vocab_size:
        raise KomtError(f"the tokenizer in {folder} has {n} tokens but config.json says vocab_size={vocab_size}: "
                        "the tokenizer does not belong to this model")
    for i in range(n, vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def _sentencepiece_vocab(folder: Path, vocab_size: int) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    path = folder / "tokenizer.model"
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf raises DecodeError, which has no stable import path
        raise KomtError(f"{path} is not a SentencePiece model: re-download it") from None
    if not proto.pieces:
        raise KomtError(f"{path} is not a SentencePiece model (no pieces): re-download it")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's piece types share GGUF's numbering
    dropped: list[str] = []

    for idx, (content, special) in sorted(_added_tokens(folder).items()):
        if idx >= vocab_size:  # convert_hf_to_gguf.py drops it too: the embedding has no row for it
            dropped.append(f"added token {content!r} has id {idx}, past the model's vocabulary (config.json "
                           f"vocab_size {vocab_size}: the embedding was not resized): dropped, as llama.cpp's "
                           "converter does")
            continue
        if idx < len(tokens):
            if tokens[idx] != content:
                raise KomtError(f"added token {content!r} claims id {idx}, which tokenizer.model gives to "
                                f"{tokens[idx]!r}: the tokenizer files disagree")
            continue
        if idx != len(tokens):
            raise KomtError(f"added token {content!r} has id {idx}, leaving a gap after {len(tokens) - 1}: "
                            "the tokenizer files are inconsistent")
        tokens.append(content)
        scores.append(-1000.0)
        types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)

    spec = proto.trainer_spec
    vocab = Vocab("llama", tokens, types, scores=scores, pre="default",
                  bos_id=spec.bos_id if spec.bos_id >= 0 else None,
                  eos_id=spec.eos_id if spec.eos_id >= 0 else None,
                  unk_id=spec.unk_id if spec.unk_id >= 0 else None,
                  pad_id=spec.pad_id if spec.pad_id >= 0 else None,
                  add_space_prefix=proto.normalizer_spec.add_dummy_prefix, warnings=dropped)
    if vocab.pad_id is None:
        for name in ("[PAD]", "<pad>"):
            if name in tokens:
                vocab.pad_id = tokens.index(name)
                break
    _check_special_map(folder, vocab)
    _pad_to(vocab, vocab_size, folder)
    return vocab


def _check_special_map(folder: Path, vocab: Vocab) -> None:
    """komt's special_tokens_map says bos = eos = unk = </s>; keep the model's ids and say so."""
    smap = {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}
    for role in ("bos", "eos", "unk"):
        want = _token_content(smap.get(f"{role}_token"))
        have_id = getattr(vocab, f"{role}_id")
        if want is None or have_id is None:
            continue
        have = vocab.tokens[have_id]
        if want != have:
            vocab.warnings.append(
                f"special_tokens_map sets {role}_token to {want!r}, but the SentencePiece model's {role} is "
                f"{have!r} (id {have_id}); writing id {have_id}, which llama.cpp needs")
    pad = _token_content(smap.get("pad_token"))
    if pad is not None and pad in vocab.tokens:
        vocab.pad_id = vocab.tokens.index(pad)


# Added tokens that llama.cpp treats as control tokens although the tokenizer does not mark them special.
def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))  # fullwidth bars (DeepSeek)
            or (token.startswith("<unused") and token.endswith(">")))


def _bpe_vocab(folder: Path, vocab_size: int) -> Vocab:
    from gguf import SpecialVocab

    from .bpe_pre import recognise

    tj = _read_json(folder / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise KomtError(f"{folder}/tokenizer.json is a {model.get('type', 'unknown')} tokenizer"
                        f"{' with byte fallback' if model.get('byte_fallback') else ''}: without tokenizer.model "
                        "only byte-level BPE is supported; add the SentencePiece tokenizer.model")
    tokenizer = _hf_tokenizer(folder)
    by_token = tokenizer.get_vocab()
    n = max(by_token.values()) + 1
    if n > vocab_size:
        raise KomtError(f"the tokenizer in {folder} has {n} tokens but config.json says vocab_size={vocab_size}: "
                        "the tokenizer does not belong to this model")
    pre = recognise(tokenizer, folder)
    by_id = {i: t for t, i in by_token.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        kind = TokenType.NORMAL
        if token in added:
            # llama.cpp matches added tokens in the text before any normalisation: store them as the tokenizer
            # would see them after it (an encode/decode round trip)
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = TokenType.CONTROL
            else:
                kind = TokenType.USER_DEFINED
                token = token.replace("\u2581", " ")  # SentencePiece's space mark, in user-defined tokens
        tokens.append(token)
        types.append(kind)
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # its notes on unusual post-processor templates are for llama.cpp's developers
    try:
        special = SpecialVocab(folder, load_merges=True)
    finally:
        gguf_log.setLevel(level)
    vocab = Vocab("gpt2", tokens, types, merges=special.merges, pre=pre, role_ids=dict(special.special_token_ids),
                  role_adds=_add_flags(special, tj, _read_json(folder / "tokenizer_config.json")))
    ids = vocab.role_ids
    vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id = (ids.get(r) for r in ("bos", "eos", "unk", "pad"))
    return vocab


def _hf_tokenizer(folder: Path):
    """The model's Hugging Face tokenizer: what llama.cpp's converter reads a byte-level BPE vocabulary through."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its advice about clean_up_tokenization_spaces is not ours to give
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # tokenizers and transformers raise many kinds; the message is what helps
        raise KomtError(f"transformers cannot load the tokenizer in {folder} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}): fix or re-download its tokenizer files") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _add_flags(special, tj: dict, config: dict) -> dict[str, bool]:
    """The add_*_token flags the pinned llama.cpp writes. gguf-py 0.19.0 (komt-edge's) and the pinned llama.cpp's
    own gguf-py read the post-processor of tokenizer.json alike, except that the latter (1) lets its choice stand
    where tokenizer_config's add_*_token disagrees, and (2) reads a ByteLevel post-processor as adding neither BOS
    nor EOS unless a template adds them (Llama 3's and Qwen2.5's tokenizers: add_eos_token is written, false)."""
    flags = dict(special.add_special_token)
    post = tj.get("post_processor") or {}
    processors = post.get("processors", [post]) if post else []

    def content(role: str) -> str | None:
        return _token_content(config.get(f"{role}_token"))

    decided: dict[str, bool] = {}  # what the post-processor says, where it says something
    for proc in processors:
        kind = proc.get("type")
        if kind == "RobertaProcessing":
            decided.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = proc.get("single", [])
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                if first:  # the leading token is taken as BOS (or CLS) when the config names no other
                    bos, cls = content("bos") or content("cls"), content("cls")
                    decided["bos"] = not config or not bos or not cls or first in (bos, cls)
                if last:  # the trailing token becomes EOS (the config's EOS, if another, becomes EOT)
                    decided["eos"] = True
    byte_level = any(proc.get("type") == "ByteLevel" for proc in processors)
    for role in ("bos", "eos"):
        if role in decided:
            flags[role] = decided[role]
        elif byte_level:
            flags[role] = False
    if "sep" in decided:
        flags["sep"] = decided["sep"]
    return flags
