"""The `hf:ORG/NAME[:SPLIT[:COLUMN]]` Korean text source, through the real huggingface_hub client against the local
Hub server (tests/hub_server.py): its split rules and its one-line error."""

from __future__ import annotations

import json
import zlib

import pytest

from komt_edge.corpora import korean_texts
from komt_edge.errors import KomtError

from .hub_server import ORG, hub  # noqa: F401 (fixture)

TRAIN = [f"훈련 문장 {i}번: 대한민국의 수도는 서울입니다." for i in range(12)]
TEST = [f"평가 문장 {i}번: 한글은 세종대왕이 만들었습니다." for i in range(4)]


def jsonl(texts: list[str]) -> bytes:
    return "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts).encode()


def test_a_dataset_with_train_and_test_files(hub):
    hub.add_repo(f"datasets/{ORG}/ko-text", {"data/train.jsonl": jsonl(TRAIN), "data/test.jsonl": jsonl(TEST),
                                             "README.md": b"# ko-text\n"})
    source = f"hf:{ORG}/ko-text"
    assert korean_texts("calibration", source) == TRAIN
    assert korean_texts("heldout", source) == TEST
    assert korean_texts("heldout", f"{source}:train") == TRAIN  # an explicit split: that file set


def test_a_dataset_with_one_file_is_split_by_record(hub):
    texts = [f"문서 {i}: 가나다라마바사 {i * 7}" for i in range(60)]
    hub.add_repo(f"datasets/{ORG}/ko-one", {"all.jsonl": jsonl(texts)})
    held = [t for t in texts if zlib.crc32(t.encode()) % 10 == 0]
    assert held and korean_texts("heldout", f"hf:{ORG}/ko-one") == held
    assert korean_texts("calibration", f"hf:{ORG}/ko-one") == [t for t in texts if t not in held]


def test_a_missing_dataset_is_one_error(hub):
    with pytest.raises(KomtError, match=f"cannot download the Hub dataset {ORG}/nothing-here"):
        korean_texts("heldout", f"hf:{ORG}/nothing-here")
