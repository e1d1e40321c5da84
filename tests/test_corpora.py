"""The Korean text module: a fixed, disjoint calibration / held-out split, the English comparison source, and
user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from komt_edge.corpora import (KOREAN_INSTRUCTIONS, LIBREOFFICE_HELP_EN_ENV, Example, hangul_fraction,
                               korean_examples, korean_texts, latin_fraction, libreoffice_help_dir, load_examples)
from komt_edge.errors import KomtError
from komt_edge.templates import LLAMA, MISTRAL


def test_splits_are_korean_sizeable_and_disjoint():
    calibration, heldout = korean_texts("calibration"), korean_texts("heldout")
    assert len(calibration) == 9 and len(heldout) == 2
    assert sum(map(len, calibration)) > 25_000 and sum(map(len, heldout)) > 6_000
    for doc in calibration + heldout:
        assert hangul_fraction(doc) > 0.6, doc[:80]
        assert "---" not in doc and "\x0c" not in doc  # comparison tables and page breaks are cut
    cal_lines = {line for doc in calibration for line in doc.split("\n")}
    held_lines = [line for doc in heldout for line in doc.split("\n")]
    assert not cal_lines.intersection(held_lines)
    # no long run of held-out text anywhere in the calibration text
    cal_text = "\n".join(calibration)
    for line in held_lines:
        for start in range(0, max(1, len(line) - 40), 40):
            chunk = line[start:start + 40]
            assert len(chunk) < 40 or chunk not in cal_text, chunk


def test_split_is_fixed():
    assert korean_texts("calibration")[0].startswith("대한민국헌법")
    assert korean_texts("heldout")[0].startswith("행정절차법 일부개정법률안")
    cached = korean_texts("calibration")
    from komt_edge.corpora import _konlpy_documents

    _konlpy_documents.cache_clear()  # read and cleaned again from konlpy's files: the same documents
    assert korean_texts("calibration") == cached and korean_texts("calibration") is not cached


def test_bills_are_unwrapped():
    bill = korean_texts("calibration")[1]  # kobill 1809890: the PDF wraps "필요\n\n한 나이이나"
    assert "보살핌이 필요한 나이이나" in bill
    assert "- 1 -" not in bill


def test_examples_hold_instructions_in_calibration_only():
    cal = korean_examples("calibration")
    assert sum(ex.prompt is not None for ex in cal) == len(KOREAN_INSTRUCTIONS)
    assert all(ex.prompt is None for ex in korean_examples("heldout"))
    assert all(ex.prompt is None for ex in korean_examples("calibration", instructions=False))


def test_example_render_uses_the_komt_template():
    ex = Example("서울입니다.", "수도는?")
    assert ex.render(MISTRAL) == "[INST]수도는? [/INST]서울입니다."
    assert ex.render(LLAMA) == "### instruction: 수도는?\n\n### Response: 서울입니다."
    assert Example("산문").render(MISTRAL) == "산문"


def test_unknown_split_and_source():
    with pytest.raises(ValueError):
        korean_texts("train")  # type: ignore[arg-type]
    with pytest.raises(KomtError, match="unknown Korean text source"):
        korean_texts("calibration", source="wikipedia")


def help_dir_or_skip(source: str):
    """The unpacked LibreOffice help of ``source``; the test is skipped when its Debian package is not unpacked
    (it is optional: `make korean-corpus`, `make english-corpus`)."""
    try:
        return libreoffice_help_dir(source)
    except KomtError as err:
        pytest.skip(str(err))


def test_english_help_is_english_disjoint_and_not_instructed():
    help_dir_or_skip("libreoffice-en")
    calibration, heldout = korean_texts("calibration", "libreoffice-en"), korean_texts("heldout", "libreoffice-en")
    assert sum(map(len, calibration)) > 1_000_000 and sum(map(len, heldout)) > 100_000
    paragraphs = [p for doc in calibration + heldout for p in doc.split("\n")]
    assert all(len(p) >= 20 and latin_fraction(p) >= 0.5 and hangul_fraction(p) == 0 for p in paragraphs)
    assert not {p for doc in calibration for p in doc.split("\n")}.intersection(
        p for doc in heldout for p in doc.split("\n"))
    assert all(ex.prompt is None for ex in korean_examples("calibration", "libreoffice-en"))  # no Korean Q&A


def test_english_and_korean_help_split_the_same_pages():
    en, ko = help_dir_or_skip("libreoffice-en"), help_dir_or_skip("libreoffice")

    def pages(root):
        return sorted(p.relative_to(root) for p in root.rglob("*.html"))

    assert pages(en) == pages(ko)
    # sbasic/guide/sample_code.html (crc32 of the path ≡ 0 mod 10) is the first held-out page in both languages
    assert korean_texts("heldout", "libreoffice-en")[0].startswith('The following examples are for a new dialog called')
    assert korean_texts("heldout", "libreoffice")[0].startswith('다음은 "Dialog1"이라는 새 대화 상자')


def test_english_help_missing_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(LIBREOFFICE_HELP_EN_ENV, raising=False)
    if any(Path("/usr/share/libreoffice/help/en-US/text").glob("*/*.html")):
        pytest.skip("LibreOffice's English help is installed system-wide")
    with pytest.raises(KomtError, match="run `make english-corpus`") as err:
        libreoffice_help_dir("libreoffice-en")
    assert "\n" not in str(err.value)


def test_latin_fraction():
    assert latin_fraction("Choose Format - Cells.") == pytest.approx(17 / 19)
    assert latin_fraction("서식 - 셀을 선택합니다.") == 0
    assert latin_fraction("Café Señor") == 1


def test_load_text_json_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("첫 문단.\n\n둘째 문단.", encoding="utf-8")
    assert load_examples(txt) == [Example("첫 문단.\n\n둘째 문단.")]

    js = tmp_path / "b.json"
    js.write_text(json.dumps({"data": ["문장", {"text": "글"}, {"instruction": "번역", "input": "사과",
                                                               "output": "apple"}]}, ensure_ascii=False))
    assert load_examples(js) == [Example("문장"), Example("글"), Example("apple", "번역\n\n사과")]

    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join([
        json.dumps({"prompt": "질문", "response": "답"}, ensure_ascii=False),
        "",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "안녕"},
                                 {"role": "assistant", "content": "반가워요"}]}, ensure_ascii=False),
        json.dumps({"conversations": [{"from": "human", "value": "뭐해"}, {"from": "gpt", "value": "쉬어"}]},
                   ensure_ascii=False),
    ]), encoding="utf-8")
    assert load_examples(jl) == [Example("답", "질문"), Example("반가워요", "안녕"), Example("쉬어", "뭐해")]


@pytest.mark.parametrize("name,content,needle", [
    ("empty.txt", "  \n", "is empty"),
    ("bad.json", "{", "not valid JSON"),
    ("bad.jsonl", '{"text": "a"}\n{oops', "bad.jsonl:2 is not valid JSON"),
    ("keys.jsonl", '{"title": "a"}', "a record needs"),
    ("none.json", "[]", "holds no text records"),
])
def test_bad_user_files(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KomtError, match=needle):
        load_examples(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "euckr.txt"
    path.write_bytes("한국어".encode("euc-kr"))
    with pytest.raises(KomtError, match="not UTF-8"):
        load_examples(path)
