"""The README's first command: the demo runs the whole spine offline and answers in Korean."""

from __future__ import annotations

import json

import pytest

from komt_edge.demo import demo
from komt_edge.tiny import DEMO_QA


@pytest.mark.train  # builds and trains its own tiny adapter, then merge → gguf → verify → chat
def test_demo_end_to_end(tmp_path):
    result = demo(tmp_path / "demo", n_threads=1, progress=False, log=lambda *_: None)
    assert result.passed, "\n".join(r.summary() for r in result.reports)
    assert [f.name for f in result.files] == ["komt-tiny-mistral-Q4_0.gguf", "komt-tiny-mistral-Q8_0.gguf"]
    # both files reproduce the Korean answer the adapter taught through the chat API (after BOS, as trained: without
    # it the q4_0 answer was noise)
    for name in ("komt-tiny-mistral-Q4_0.gguf", "komt-tiny-mistral-Q8_0.gguf"):
        assert result.answers[name].startswith(DEMO_QA[0][1][:20]), (name, result.answers[name])
    # what `komt-edge demo --json` writes
    data = json.loads(json.dumps(result.to_dict(), ensure_ascii=False))
    assert data["passed"] is True and len(data["verification"]["reports"]) == 2 and data["answers"] == result.answers
