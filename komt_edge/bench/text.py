"""The Korean text that `bench quality` scores and `bench speed` counts characters per token on."""

from __future__ import annotations

from pathlib import Path

from .. import corpora
from ..errors import KomtError
from ..util import read_llama_cpp_text


def korean_eval_text(text: str | Path | None = None, *, source: str = "konlpy") -> tuple[str, str]:
    """The evaluation text and a description: a user's UTF-8 file, else the held-out split of a built-in
    corpus (``komt_edge.corpora``: never seen by calibration).

    A file is read as llama-perplexity's ``-f`` reads it, so that both tools score the same tokens: its characters as
    they are (Windows line ends stay ``\\r\\n``; Python's default text mode would make them ``\\n``, a different
    token sequence), less one final ``\\n``."""
    if text is not None:
        path = Path(text)
        body = read_llama_cpp_text(path, missing=f"{path} is not a file: pass a UTF-8 text file with --text",
                                   folder=f"--text {path} is a folder: pass one UTF-8 text file")
        if not body.strip():
            raise KomtError(f"{path} is empty")
        return body, f"file {path.name} ({len(body)} characters)"
    docs = corpora.korean_texts("heldout", source=source)
    body = "\n\n".join(docs)
    return body, f"{source} held-out split ({len(docs)} documents, {len(body)} characters)"
