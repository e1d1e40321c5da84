"""Korean text for calibration and evaluation, offline, with a fixed train/held-out split.

The built-in source, ``"konlpy"``, is the small Korean corpus that the PyPI package konlpy ships as data files
(``pip install --no-deps konlpy``; konlpy's code, and Java, are never used):

- ``kolaw/constitution.txt``: the Constitution of the Republic of Korea (대한민국헌법, ~19k characters);
- ``kobill/18098xx.txt``: ten bills put to the 18th National Assembly in November 2010 (~46k characters).

Both are official government documents, which the Korean Copyright Act (article 7) leaves unprotected; the
konlpy package that carries them is GPL-3.0-or-later, and komt-edge only reads these text files from it.
The bills are PDF extracts: :func:`korean_texts` unwraps their hard line breaks, drops page numbers and cuts
each bill before its old/new comparison table (신·구조문대비표, mostly dashes) and blanks other dash runs.

The split is fixed, by document, and never changes between releases (benchmarks stay comparable):

==============  ==================================================================  ============
split           documents                                                            ~ tokens*
==============  ==================================================================  ============
calibration     constitution.txt, kobill 1809890-1809895, 1809897, 1809898, plus   ~ 32,500
                :data:`KOREAN_INSTRUCTIONS` (komt-edge's own Korean Q&A pairs)
heldout         kobill 1809896.txt (행정절차법), 1809899.txt (결혼중개업법)          ~ 7,700
==============  ==================================================================  ============

(* with the Mistral/Llama-2 SentencePiece tokenizer, ~0.9 Korean characters per token.) Held-out lines that
also occur verbatim in a calibration document (boilerplate such as "이 법은 공포한 날부터 시행한다.") are
removed from the held-out text, so calibration never sees evaluation text.

Two more sources, for ``komt-edge bench``: ``"libreoffice"`` (the Korean help pages of LibreOffice, ~600k
characters of natural prose) and ``"hf:ORG/NAME[:SPLIT[:COLUMN]]"`` (a Hub dataset); their splits are
described where they are read, below. One source is English, for comparison only: ``"libreoffice-en"``, the same
LibreOffice help pages in English with the same page split, which benchmarks use to measure what Korean text buys
over English text of the same kind (e.g. for an importance matrix).

User data goes through :func:`load_examples`: a UTF-8 ``.txt`` file (one document), or ``.json`` /
``.jsonl`` records: plain strings, ``{"text": ...}``, or instruction records and chats as
:mod:`komt_edge.records` reads them for training too. Instruction records become :class:`Example` objects with
a ``prompt``, which :meth:`Example.render` wraps in the model's komt prompt template exactly as training does.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from .errors import KomtError
from .records import Record, prompt_of, read_records, render
from .util import package_dir

if TYPE_CHECKING:
    from .templates import PromptTemplate

Split = Literal["calibration", "heldout"]
SPLITS: tuple[str, ...] = ("calibration", "heldout")
SOURCES: tuple[str, ...] = ("konlpy", "libreoffice", "libreoffice-en")  # and "hf:ORG/NAME[:SPLIT[:COLUMN]]"

KONLPY_CALIBRATION: tuple[str, ...] = (
    "kolaw/constitution.txt",
    "kobill/1809890.txt", "kobill/1809891.txt", "kobill/1809892.txt", "kobill/1809893.txt",
    "kobill/1809894.txt", "kobill/1809895.txt", "kobill/1809897.txt", "kobill/1809898.txt",
)
KONLPY_HELDOUT: tuple[str, ...] = ("kobill/1809896.txt", "kobill/1809899.txt")
LIBREOFFICE_HELP_ENV = "KOMT_EDGE_LIBREOFFICE_HELP"
LIBREOFFICE_LICENSE = "MPL-2.0 (Debian libreoffice-help-ko, LibreOffice 7.4 help)"
LIBREOFFICE_HELP_EN_ENV = "KOMT_EDGE_LIBREOFFICE_HELP_EN"
LIBREOFFICE_EN_LICENSE = "MPL-2.0 (Debian libreoffice-help-en-us, LibreOffice 7.4 help)"

# Korean instruction data written for komt-edge (same licence as komt-edge). Calibration split only; rendered
# in the model's komt prompt template so that the template markers are calibrated the way komt is prompted.
KOREAN_INSTRUCTIONS: tuple[tuple[str, str], ...] = (
    ("한국의 사계절에 대해 설명해 주세요.",
     "한국은 봄, 여름, 가을, 겨울의 사계절이 뚜렷합니다. 봄에는 개나리와 진달래가 피고, 여름은 덥고 습하며 "
     "장마가 있습니다. 가을에는 하늘이 높고 단풍이 아름다우며, 겨울은 춥고 건조합니다."),
    ("김치는 어떻게 만드나요?",
     "배추를 소금에 절인 뒤 물기를 빼고, 고춧가루, 마늘, 생강, 젓갈, 파 등을 섞은 양념을 배추 잎 사이사이에 "
     "골고루 바릅니다. 그다음 항아리나 밀폐 용기에 담아 서늘한 곳에서 익히면 됩니다."),
    ("다음 문장을 영어로 번역하세요: 저는 매일 아침 커피를 마십니다.", "I drink coffee every morning."),
    ("인공지능이 우리 생활에 미치는 영향은 무엇인가요?",
     "인공지능은 번역, 검색, 의료, 교육, 금융 등 많은 분야에서 일하는 방식을 바꾸고 있습니다. 반복적인 업무를 "
     "자동화해 생산성을 높이는 한편, 개인정보 보호와 일자리 변화 같은 새로운 과제도 만들고 있습니다."),
    ("서울에서 부산까지 가는 방법을 알려 주세요.",
     "가장 빠른 방법은 KTX로, 서울역에서 부산역까지 약 2시간 30분이 걸립니다. 고속버스는 약 4시간 30분, "
     "자동차로는 경부고속도로를 이용해 5시간 안팎이 걸리며, 김포공항에서 김해공항까지 비행기로 갈 수도 있습니다."),
    ("훈민정음은 누가 언제 만들었나요?",
     "훈민정음은 조선의 세종대왕이 1443년에 창제하고 1446년에 반포한 문자입니다. 백성이 쉽게 배워 쓸 수 "
     "있도록 만든 글자로, 오늘날 한글이라고 부릅니다."),
    ("건강을 위해 하루에 물을 얼마나 마셔야 하나요?",
     "사람마다 다르지만 성인은 보통 하루에 1.5리터에서 2리터 정도의 물을 마시는 것이 권장됩니다. 운동을 "
     "하거나 날씨가 더울 때는 더 많이 마셔야 합니다."),
    ("파이썬에서 리스트를 정렬하는 방법은?",
     "sorted(리스트)는 정렬된 새 리스트를 돌려주고, 리스트.sort()는 원래 리스트를 제자리에서 정렬합니다. "
     "내림차순으로 정렬하려면 reverse=True를 넘기면 됩니다."),
    ("좋은 수면 습관을 세 가지만 알려 주세요.",
     "첫째, 매일 같은 시간에 자고 일어나세요. 둘째, 잠들기 한 시간 전에는 휴대전화와 같은 화면을 멀리하세요. "
     "셋째, 오후 늦게는 카페인이 든 음료를 피하세요."),
    ("다음 글을 한 문장으로 요약하세요: 오늘 회의에서는 다음 분기 예산과 신제품 출시 일정, 그리고 채용 계획을 "
     "논의했다. 예산은 10% 늘리기로 했고 출시는 5월로 미뤘다.",
     "회의에서 예산을 10% 늘리고 신제품 출시를 5월로 미루기로 했습니다."),
    ("대한민국의 수도는 어디인가요?",
     "대한민국의 수도는 서울특별시입니다. 서울은 한강을 끼고 있으며 약 940만 명이 살고 있습니다."),
    ("비 오는 날에 어울리는 음식을 추천해 주세요.",
     "비 오는 날에는 파전과 막걸리, 따뜻한 칼국수나 수제비가 잘 어울립니다. 김치찌개처럼 얼큰한 국물 요리도 "
     "좋습니다."),
)


@dataclass(frozen=True)
class Example:
    """One calibration/evaluation record: prose (``prompt is None``) or an instruction and its answer."""

    text: str  # prose, or the answer to ``prompt``
    prompt: str | None = None  # instruction data: the user's turn

    @classmethod
    def of(cls, item: Record | str) -> "Example":
        """An instruction record (its prompt as training builds it) or prose."""
        return cls(item.output, prompt_of(item)) if isinstance(item, Record) else cls(item)

    def render(self, template: "PromptTemplate | None" = None) -> str:
        """The text a model sees: instruction data in the komt template (``prefix + prompt + suffix + answer``)."""
        if self.prompt is None:
            return self.text
        if template is None:
            return f"{self.prompt}\n\n{self.text}"
        return render(template, self.prompt, self.text)


# --- konlpy, the default source -----------------------------------------------------------------------------

def konlpy_corpus_dir() -> Path:
    """The corpus folder of the installed konlpy package (data files only)."""
    path = package_dir("konlpy", missing="the built-in Korean text needs the konlpy package's data files: "
                       "pip install --no-deps konlpy (make install does this)") / "data" / "corpus"
    missing = [f for f in KONLPY_CALIBRATION + KONLPY_HELDOUT if not (path / f).is_file()]
    if missing:
        raise KomtError(f"{path / missing[0]} is missing: reinstall konlpy (pip install --no-deps konlpy)")
    return path


_PAGE_NUMBER = re.compile(r"^\s*-\s*\d+\s*-\s*$")
_COMPARISON_TABLE = re.compile(r"신\s*[·ㆍ․]?\s*구\s*조\s*문\s*대\s*비\s*표")
_NEW_PARAGRAPH = re.compile(r"^(\s|제\s*\d+\s*조|부\s*칙|\d+\.|[①-⑳]|[가-하]\.)")
_SENTENCE_END = re.compile(r"([.!?:]|다|임|음|함|\))\s*$")


def clean_bill(raw: str) -> str:
    """A kobill PDF extract as paragraphs: page numbers and the comparison table removed, hard wraps joined."""
    text = raw.replace("\r\n", "\n").replace("\x0c", "\n")
    cut = _COMPARISON_TABLE.search(text)
    if cut:
        text = text[:cut.start()]
    lines = [re.sub(r"-{3,}", " ", line) for line in text.split("\n") if not _PAGE_NUMBER.match(line)]
    lines = [line for line in lines if line.strip()]
    paragraphs: list[str] = []
    for line in lines:
        if paragraphs and not _SENTENCE_END.search(paragraphs[-1]) and not _NEW_PARAGRAPH.match(line):
            paragraphs[-1] += line  # a PDF wrap: the break sits inside a word or after its trailing space
        else:
            paragraphs.append(line)
    return "\n".join(" ".join(re.sub(r"-{3,}", " ", p).split()) for p in paragraphs)


def clean_law(raw: str) -> str:
    """The constitution: one paragraph per line already; normalise whitespace."""
    lines = (" ".join(line.split()) for line in raw.replace("\r\n", "\n").split("\n"))
    return "\n".join(line for line in lines if line)


@lru_cache(maxsize=None)
def _konlpy_documents(split: str) -> tuple[str, ...]:
    root = konlpy_corpus_dir()

    def read(name: str) -> str:
        raw = (root / name).read_text(encoding="utf-8")
        return clean_law(raw) if name.startswith("kolaw/") else clean_bill(raw)

    calibration = tuple(read(n) for n in KONLPY_CALIBRATION)
    if split == "calibration":
        return calibration
    seen = {line for doc in calibration for line in doc.split("\n")}
    heldout = []
    for name in KONLPY_HELDOUT:
        kept = [line for line in read(name).split("\n") if line not in seen]
        heldout.append("\n".join(kept))
    return tuple(heldout)


# --- LibreOffice's help, in Korean (and in English, for comparison) -----------------------------------------
#
# ``source="libreoffice"``: natural Korean prose, the Korean help pages of LibreOffice 7.4 from Debian's
# ``libreoffice-help-ko`` package (MPL-2.0, some files Apache-2.0; ~10k paragraphs, ~600k characters). The package
# is read where ``dpkg-deb -x`` left it (no LibreOffice needed): ``$KOMT_EDGE_LIBREOFFICE_HELP``,
# ``~/.cache/komt-edge/libreoffice-help-ko`` (``make korean-corpus`` puts it there) or /usr/share. Paragraphs are
# the ``<p>`` texts that are mostly Hangul (≥ 50%, ≥ 20 characters), in file order, deduplicated. The split is by
# page, fixed: a page is held out when crc32 of its path (relative to ``help/ko/text``) is 0 modulo 10 (~10%);
# a held-out paragraph that also occurs on a calibration page is dropped.
#
# ``source="libreoffice-en"``, the one English source: the same pages from ``libreoffice-help-en-us``
# (``$KOMT_EDGE_LIBREOFFICE_HELP_EN``, ``~/.cache/komt-edge/libreoffice-help-en-us``: ``make english-corpus``), read
# the same way but keeping the paragraphs that are mostly Latin letters (≥ 50%). Page paths relative to
# ``help/en-US/text`` are those of the Korean package, so each page falls in the same split in both languages.

@dataclass(frozen=True)
class _HelpPackage:
    """Where one language of the LibreOffice help is unpacked, and which of its paragraphs are kept."""

    language: str  # for messages: "Korean"
    folder: str  # the language's folder under usr/share/libreoffice/help
    package: str  # the Debian package
    env: str  # the variable that names an unpacked copy
    make_target: str
    licence: str
    keep: Callable[[str], bool]  # a paragraph of this language


_HELP_PACKAGES: dict[str, _HelpPackage] = {
    "libreoffice": _HelpPackage("Korean", "ko", "libreoffice-help-ko", LIBREOFFICE_HELP_ENV, "korean-corpus",
                                LIBREOFFICE_LICENSE, lambda p: hangul_fraction(p) >= 0.5),
    "libreoffice-en": _HelpPackage("English", "en-US", "libreoffice-help-en-us", LIBREOFFICE_HELP_EN_ENV,
                                   "english-corpus", LIBREOFFICE_EN_LICENSE, lambda p: latin_fraction(p) >= 0.5),
}


def libreoffice_help_dir(source: str = "libreoffice") -> Path:
    """``help/ko/text`` of an extracted libreoffice-help-ko package (``help/en-US/text`` of libreoffice-help-en-us
    for ``source="libreoffice-en"``)."""
    pkg = _HELP_PACKAGES[source]
    roots = [os.environ.get(pkg.env), str(Path.home() / ".cache" / "komt-edge" / pkg.package), "/"]
    for root in filter(None, roots):
        for sub in (f"usr/share/libreoffice/help/{pkg.folder}/text", f"help/{pkg.folder}/text", f"{pkg.folder}/text",
                    "text", "."):
            cand = Path(root) / sub
            if (cand / "shared").is_dir() and any(cand.glob("*/*.html")):
                return cand
    raise KomtError(f"the {pkg.language} LibreOffice help is not extracted: run `make {pkg.make_target}` (apt-get "
                    f"download {pkg.package} && dpkg-deb -x *.deb ~/.cache/komt-edge/{pkg.package}) or set {pkg.env}")


def _html_paragraphs(html: str, keep: Callable[[str], bool]) -> list[str]:
    """The ``<p>`` texts of a help page (whitespace normalised) of at least 20 characters that ``keep`` accepts."""
    class P(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.depth, self.skip, self.buf, self.out = 0, 0, [], []

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style", "header", "footer", "nav"):
                self.skip += 1
            elif tag == "p":
                self.depth += 1

        def handle_endtag(self, tag):
            if tag in ("script", "style", "header", "footer", "nav"):
                self.skip = max(0, self.skip - 1)
            elif tag == "p" and self.depth:
                self.depth -= 1
                if not self.depth:
                    self.out.append(" ".join("".join(self.buf).split()))
                    self.buf = []

        def handle_data(self, data):
            if self.depth and not self.skip:
                self.buf.append(data)

    parser = P()
    parser.feed(html)
    return [p for p in parser.out if len(p) >= 20 and keep(p)]


@lru_cache(maxsize=None)
def _libreoffice_documents(source: str) -> dict[str, tuple[str, ...]]:
    """Both splits of a LibreOffice help source (the pages are parsed once for both)."""
    root = libreoffice_help_dir(source)
    pages: dict[str, list[str]] = {"calibration": [], "heldout": []}
    for html in sorted(root.rglob("*.html")):
        rel = html.relative_to(root).as_posix()
        paras = _html_paragraphs(html.read_text(encoding="utf-8", errors="replace"), _HELP_PACKAGES[source].keep)
        if paras:
            pages["heldout" if zlib.crc32(rel.encode()) % 10 == 0 else "calibration"].append("\n".join(paras))
    seen: set[str] = set()
    calibration = []
    for page in pages["calibration"]:
        kept = [p for p in page.split("\n") if p not in seen]
        seen.update(kept)
        if kept:
            calibration.append("\n".join(kept))
    heldout, seen_h = [], set()
    for page in pages["heldout"]:
        kept = [p for p in page.split("\n") if p not in seen and p not in seen_h]
        seen_h.update(kept)
        if kept:
            heldout.append("\n".join(kept))
    return {"calibration": tuple(calibration), "heldout": tuple(heldout)}


# --- Hub datasets -------------------------------------------------------------------------------------------
#
# ``source="hf:ORG/NAME"`` (optionally ``hf:ORG/NAME:SPLIT:COLUMN``): a Hub dataset through huggingface_hub (its
# cache, HF_TOKEN, HF_ENDPOINT; .jsonl/.json/.txt/.csv/.parquet files). Its own test/validation files are the
# held-out split and its train files the calibration split; a dataset with one file set is split by record
# (crc32 of the text, 1 in 10 held out).

def _hub_records(spec: str, split: str) -> tuple[str, ...]:
    """Texts of a Hub dataset ``hf:ORG/NAME[:SPLIT[:COLUMN]]`` for our split (see the comment above)."""
    parts = spec[3:].split(":")
    repo, want_split, column = parts[0], (parts[1] if len(parts) > 1 else ""), (parts[2] if len(parts) > 2 else "")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, repo_type="dataset",
                                        allow_patterns=["*.jsonl", "*.json", "*.txt", "*.csv", "*.parquet"]))
    except Exception as err:
        raise KomtError(f"cannot download the Hub dataset {repo} ({type(err).__name__}: {err}); check the name, "
                        "HF_TOKEN and the network") from None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".txt", ".csv",
                                                                                     ".parquet"))
    if not files:
        raise KomtError(f"the Hub dataset {repo} has no .jsonl/.json/.txt/.csv/.parquet files")

    def role(p: Path) -> str:
        name = p.relative_to(folder).as_posix().lower()  # not the cache path (which may say "test")
        if want_split:
            return "heldout" if want_split.lower() in name else "other"
        return "heldout" if any(k in name for k in ("test", "valid", "eval", "dev")) else "calibration"

    def texts(p: Path) -> list[str]:
        if p.suffix in (".parquet", ".csv"):
            import pandas as pd

            frame = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            col = column or next((c for c in ("text", "document", "content", "sentence") if c in frame.columns), None)
            if col is None:
                raise KomtError(f"{p.name} has no text column ({list(frame.columns)[:6]}): pass hf:{repo}:SPLIT:COLUMN")
            return [str(t) for t in frame[col].dropna()]
        return [ex.render() for ex in load_examples(p)]

    roles = {p: role(p) for p in files}
    if want_split:
        chosen = [p for p in files if roles[p] == "heldout"] or files
        records = [t for p in chosen for t in texts(p)]
        return tuple(records)
    if {"heldout", "calibration"} <= set(roles.values()):
        return tuple(t for p in files if roles[p] == split for t in texts(p))
    records = [t for p in files for t in texts(p)]
    held = {i for i, t in enumerate(records) if zlib.crc32(t.encode()) % 10 == 0}
    return tuple(t for i, t in enumerate(records) if (i in held) == (split == "heldout"))


# --- the texts of a source ----------------------------------------------------------------------------------

def _check(split: str, source: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise KomtError(f"unknown Korean text source {source!r}; built-in sources: {', '.join(SOURCES)}")


def korean_texts(split: Split, source: str = "konlpy") -> list[str]:
    """The prose documents of ``split`` (``"calibration"`` or ``"heldout"``), cleaned, one string per document,
    from ``source``: ``"konlpy"``, ``"libreoffice"`` or ``"hf:ORG/NAME[:SPLIT[:COLUMN]]"``; or, for comparison
    with Korean, the one English source ``"libreoffice-en"`` (the same LibreOffice pages in English, same split).

    The two splits never share a document or a line (see the module docstring for the fixed assignment).
    """
    if source.startswith("hf:"):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return list(_hub_records(source, split))
    _check(split, source)
    if source in _HELP_PACKAGES:
        return list(_libreoffice_documents(source)[split])
    return list(_konlpy_documents(split))


def korean_examples(split: Split, source: str = "konlpy", *, instructions: bool = True) -> list[Example]:
    """:func:`korean_texts` as :class:`Example` records; the calibration split also holds
    :data:`KOREAN_INSTRUCTIONS` (unless ``instructions=False``, or for the English source) as instruction data."""
    examples = [Example(t) for t in korean_texts(split, source)]
    if split == "calibration" and instructions and source != "libreoffice-en":
        examples += [Example(answer, prompt) for prompt, answer in KOREAN_INSTRUCTIONS]
    return examples


def describe(source: str = "konlpy") -> str:
    """One line naming the source and its licence, for reports and metadata."""
    if source in _HELP_PACKAGES:
        pkg = _HELP_PACKAGES[source]
        return f"LibreOffice 7.4 {pkg.language} help pages, {pkg.licence}"
    if source.startswith("hf:"):
        return f"Hub dataset {source[3:]} (see its card for the licence)"
    _check("calibration", source)
    return ("konlpy kolaw + kobill: Korean Constitution and 2010 National Assembly bills, official works "
            "free of copyright under Korean Copyright Act art. 7")


# --- user files ---------------------------------------------------------------------------------------------

def load_examples(path: str | Path) -> list[Example]:
    """Records from a user file, read by :func:`komt_edge.records.read_records`: ``.json`` (a list, or an object
    with a ``data``/``train`` list), ``.jsonl`` (one record per line) or anything else as UTF-8 text (the whole
    file is one document)."""
    return [Example.of(item) for item in read_records(path, prose=True)]


def hangul_fraction(text: str) -> float:
    """Share of Hangul syllables among the non-space characters of ``text``."""
    chars = [c for c in text if not c.isspace()]
    return sum("\uac00" <= c <= "\ud7a3" for c in chars) / max(1, len(chars))


def latin_fraction(text: str) -> float:
    """Share of Latin letters (Basic Latin to Latin Extended-B: English, with accented names) among the non-space
    characters of ``text``."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() and c < "\u0250" for c in chars) / max(1, len(chars))
