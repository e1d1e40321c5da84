"""Tokenizer → GGUF vocabulary: SentencePiece ``tokenizer.model`` (komt, Llama-2, Mistral) and byte-level BPE
``tokenizer.json`` (SmolLM2 and other GPT-2 style vocabularies).

komt quirks handled here:
- the ``[PAD]`` token komt adds at id 32000 (added_tokens.json / tokenizer.json) becomes the padding token;
- komt's special_tokens_map maps bos, eos and unk all to ``</s>``: llama.cpp needs the ids the SentencePiece
  model defines (bos 1, eos 2, unk 0), so those are written and the disagreement is reported as a warning.
"""

from __future__ import annotations

import json
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


def load_vocab(folder: Path, vocab_size: int) -> Vocab:
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(folder, vocab_size)
    elif (folder / "tokenizer.json").is_file():
        vocab = _bpe_vocab(folder, vocab_size)
    else:
        raise KomtError(f"no tokenizer in {folder}: expected tokenizer.model (SentencePiece) or tokenizer.json; "
                        "copy the tokenizer files of the base model into the folder")
    _apply_config_flags(folder, vocab)
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


# Byte-level BPE pre-tokenizers llama.cpp knows, recognised by the shape of tokenizer.json's pre_tokenizer.
def _bpe_pre(pre_tokenizer: dict | None) -> str:
    if not pre_tokenizer:
        return "default"
    kinds = [p.get("type") for p in pre_tokenizer.get("pretokenizers", [pre_tokenizer])]
    digits = [p for p in pre_tokenizer.get("pretokenizers", []) if p.get("type") == "Digits"]
    if kinds == ["Digits", "ByteLevel"] and digits and digits[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    return "default"


def _bpe_vocab(folder: Path, vocab_size: int) -> Vocab:
    tj = _read_json(folder / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise KomtError(f"{folder}/tokenizer.json is a {model.get('type', 'unknown')} tokenizer"
                        f"{' with byte fallback' if model.get('byte_fallback') else ''}: without tokenizer.model "
                        "only byte-level BPE is supported; add the SentencePiece tokenizer.model")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = _added_tokens(folder)
    for idx, (content, _special) in added.items():
        by_id[idx] = content
    n = max(by_id) + 1
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i][1] else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}

    def tid(role: str) -> int | None:
        content = _token_content(cfg.get(f"{role}_token"))
        return tokens.index(content) if content in tokens else None

    vocab = Vocab("gpt2", tokens, types, merges=merges, pre=_bpe_pre(tj.get("pre_tokenizer")),
                  bos_id=tid("bos"), eos_id=tid("eos"), unk_id=tid("unk"), pad_id=tid("pad"), add_bos=False)
    if vocab.pre == "default":
        vocab.warnings.append("unrecognised byte-level BPE pre-tokenizer; using llama.cpp's default: "
                              "run `komt-edge verify` to check tokenizer parity")
    _pad_to(vocab, vocab_size, folder)
    return vocab
