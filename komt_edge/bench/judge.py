"""`komt-edge bench judge`: komt's evaluation protocol, with an LLM judge behind any OpenAI-compatible endpoint.

komt evaluated its models by asking a fixed set of Korean questions, having ChatGPT grade each answer from 0 to 5,
and reporting the total score, the average (0-5) and the percentage of the maximum. This module does the same:

1. the model under test (a GGUF file, run by llama.cpp) answers every question of :data:`KOREAN_QUESTIONS`,
   formatted with its komt prompt template (``--template``, default: the template stored in the file; a non-komt
   file is prompted through its own chat template), greedily;
2. each answer goes to the judge through ``POST {url}/chat/completions`` (OpenAI's chat API: OpenAI, vLLM,
   llama.cpp's llama-server, Ollama, or `komt-edge serve`), with the prompt :data:`JUDGE_PROMPT`;
3. the judge's reply must end with ``점수: N`` (0-5); a reply without a score counts 0 and is flagged.

The judge prompt is komt-edge's own (komt did not publish theirs); it is printed by ``komt-edge bench judge
--show-prompt`` and documented in the README. Endpoint, model and key come from options or the environment
(``KOMT_JUDGE_URL``, ``KOMT_JUDGE_MODEL``, ``KOMT_JUDGE_API_KEY`` or ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..converters.gguf_file import GgufHeader, check_model_gguf
from ..errors import KomtError
from ..llamacpp import open_llama
from ..templates import PromptTemplate, gguf_template, template_for
from .runner import environment

# (category, question): everyday knowledge, culture, writing, reasoning, translation, coding, as komt's set mixes.
KOREAN_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("상식", "대한민국의 수도와 가장 큰 항구 도시는 어디인가요?"),
    ("상식", "지구에서 가장 큰 대양은 무엇이며, 그 특징을 두 가지 설명해 주세요."),
    ("역사", "세종대왕이 훈민정음을 만든 이유를 설명해 주세요."),
    ("역사", "임진왜란에서 이순신 장군이 한 역할을 간단히 설명해 주세요."),
    ("문화", "한국의 명절인 추석에는 주로 무엇을 하나요?"),
    ("문화", "김치를 담그는 기본적인 과정을 순서대로 설명해 주세요."),
    ("생활", "건강한 수면 습관을 세 가지 추천해 주세요."),
    ("생활", "처음 운동을 시작하는 사람에게 해 줄 조언을 알려 주세요."),
    ("작문", "봄을 주제로 짧은 시를 한 편 지어 주세요."),
    ("작문", "회사 동료에게 보내는 감사 이메일을 정중하게 써 주세요."),
    ("요약", "다음 글을 한 문장으로 요약하세요: 오늘 회의에서는 다음 분기 예산과 신제품 출시 일정, 채용 계획을 "
             "논의했다. 예산은 10% 늘리기로 했고, 출시는 5월로 미뤘으며, 개발자 두 명을 새로 뽑기로 했다."),
    ("추론", "철수는 영희보다 키가 크고, 영희는 민수보다 키가 큽니다. 세 사람 중 누가 가장 작나요? 이유도 설명하세요."),
    ("수학", "사과 3개가 1,500원이라면 사과 10개는 얼마인가요? 계산 과정을 보여 주세요."),
    ("번역", "다음 문장을 영어로 번역하세요: 저는 매일 아침 공원에서 산책을 합니다."),
    ("번역", "Translate into Korean: The library opens at nine and closes at six on weekdays."),
    ("코딩", "파이썬으로 리스트에서 짝수만 골라내는 코드를 작성하고 설명해 주세요."),
    ("과학", "물이 100도에서 끓는 이유를 초등학생도 이해할 수 있게 설명해 주세요."),
    ("경제", "인플레이션이 무엇이며 우리 생활에 어떤 영향을 주는지 설명해 주세요."),
    ("윤리", "인공지능을 사용할 때 주의해야 할 점을 세 가지 설명해 주세요."),
    ("여행", "제주도에서 하루 동안 여행할 수 있는 일정을 추천해 주세요."),
)

JUDGE_SYSTEM = "당신은 한국어 AI 어시스턴트의 답변을 공정하고 엄격하게 채점하는 평가자입니다."

JUDGE_PROMPT = """다음은 사용자의 질문과 AI 어시스턴트의 답변입니다. 답변을 0점부터 5점까지의 정수로 채점하세요.

채점 기준:
- 5점: 질문에 정확하고 완전하게 답했으며, 자연스럽고 올바른 한국어로 썼다.
- 4점: 대체로 정확하고 유용하지만 사소한 누락이나 어색한 표현이 있다.
- 3점: 부분적으로만 맞거나 중요한 내용이 빠졌다.
- 2점: 질문과 관련은 있으나 오류가 많거나 한국어가 부자연스럽다.
- 1점: 대부분 틀렸거나 질문과 거의 관련이 없다.
- 0점: 답변이 없거나, 의미 없는 문장이거나, 한국어로 답하지 않았다(번역 요청 제외).

[질문]
{question}

[답변]
{answer}

먼저 한두 문장으로 채점 이유를 쓰고, 마지막 줄에 반드시 "점수: N" 형식으로 점수만 쓰세요."""


def judge_prompt(n_questions: int | None = None) -> str:
    """The judge's system message and prompt, then the questions (the first ``n_questions``), numbered: what
    ``komt-edge bench judge --show-prompt`` prints."""
    questions = KOREAN_QUESTIONS[:n_questions] if n_questions else KOREAN_QUESTIONS
    listed = "\n".join(f"{i:2d}. [{category}] {q}" for i, (category, q) in enumerate(questions, 1))
    return f"system: {JUDGE_SYSTEM}\n\n{JUDGE_PROMPT}\n\n{listed}"


_SCORE = re.compile(r"점수\s*[:：]?\s*\**\s*([0-5])(?:\s*/\s*5)?")
_JSON_SCORE = re.compile(r'"score"\s*:\s*([0-5])')


def parse_score(reply: str) -> int | None:
    """The judge's score: the last ``점수: N`` (or ``"score": N``) in the reply, 0-5; None when absent."""
    found = _SCORE.findall(reply) or _JSON_SCORE.findall(reply)
    return int(found[-1]) if found else None


@dataclass
class JudgedAnswer:
    category: str
    question: str
    answer: str
    score: int  # 0 when the judge gave none
    parsed: bool  # whether the judge's reply held a score
    judge_reply: str
    seconds_answer: float = 0.0


@dataclass
class JudgeReport:
    model: str
    template: str
    judge_url: str
    judge_model: str
    answers: list[JudgedAnswer]
    env: dict = field(default_factory=dict)

    @property
    def score(self) -> int:
        return sum(a.score for a in self.answers)

    @property
    def average(self) -> float:
        return self.score / len(self.answers) if self.answers else 0.0

    @property
    def percentage(self) -> float:
        return 100.0 * self.average / 5.0

    @property
    def unparsed(self) -> int:
        return sum(not a.parsed for a in self.answers)

    def to_dict(self) -> dict:
        return {"kind": "judge", **asdict(self), "score": self.score, "average": self.average,
                "percentage": self.percentage, "questions": len(self.answers), "unparsed": self.unparsed,
                "judge_prompt": JUDGE_PROMPT, "judge_system": JUDGE_SYSTEM}

    def summary(self) -> str:
        """What `komt-edge bench judge` prints: :meth:`markdown`."""
        return self.markdown()

    def markdown(self) -> str:
        lines = [f"Judge: {self.judge_model} at {self.judge_url}; {len(self.answers)} Korean questions, "
                 f"template {self.template}.", "",
                 "| model | score | average (0-5) | percentage |", "| --- | ---: | ---: | ---: |",
                 f"| {Path(self.model).name} | {self.score} | {self.average:.2f} | {self.percentage:.2f}% |"]
        if self.unparsed:
            lines += ["", f"{self.unparsed} judge replies held no score and counted 0."]
        lines += ["", "| # | category | score | question |", "| ---: | --- | ---: | --- |"]
        for i, a in enumerate(self.answers, 1):
            lines.append(f"| {i} | {a.category} | {a.score if a.parsed else '0 (no score)'} | {a.question[:40]} |")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The OpenAI-compatible client (stdlib only).
# ---------------------------------------------------------------------------------------------------

JUDGE_CTX = 4096  # the context of a --judge-gguf judge (or its training context, if smaller)


def judge_settings(url: str | None, model: str | None, key: str | None) -> tuple[str, str, str | None]:
    url = url or os.environ.get("KOMT_JUDGE_URL")
    model = model or os.environ.get("KOMT_JUDGE_MODEL")
    key = key or os.environ.get("KOMT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not url:
        raise KomtError("no judge endpoint: pass --judge-url (e.g. https://api.openai.com/v1 or "
                        "http://127.0.0.1:8080/v1) or set KOMT_JUDGE_URL")
    if not model:
        raise KomtError("no judge model: pass --judge-model (e.g. gpt-4o) or set KOMT_JUDGE_MODEL")
    return url.rstrip("/"), model, key


def post_chat(url: str, model: str, messages: list[dict], *, key: str | None = None, timeout: float = 120.0,
         max_tokens: int = 256, temperature: float = 0.0) -> str:
    """One ``POST {url}/chat/completions``; returns the assistant's text. Network failures become KomtError."""
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{url}/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:200]
        raise KomtError(f"the judge endpoint {url} answered HTTP {err.code} ({detail.strip() or err.reason}): "
                        "check --judge-url, --judge-model and the API key") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise KomtError(f"the judge endpoint {url} is unreachable ({reason}): start the server or fix "
                        "--judge-url") from None
    except json.JSONDecodeError:
        raise KomtError(f"the judge endpoint {url} did not answer JSON: is it an OpenAI-compatible /v1 URL?") from None
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise KomtError(f"the judge endpoint {url} answered without choices[0].message.content: "
                        "it is not an OpenAI-compatible chat endpoint") from None


# ---------------------------------------------------------------------------------------------------
# The model under test.
# ---------------------------------------------------------------------------------------------------

def _prompt_template(path: Path, template: str | None) -> tuple[str, PromptTemplate | None]:
    """The komt template to wrap questions in: --template, else the one the file stores (komt-edge writes it).
    A file storing another chat template gives ("chat", None): it is prompted through its own template."""
    if template not in (None, "auto"):
        return template, template_for(template)
    stored, family = gguf_template(path)
    if family is not None:
        return family, template_for(family)
    if stored:
        return "chat", None
    raise KomtError("the file stores no chat template: pass --template llama or --template mistral")


def judge(model: str | Path | None, *, judge_url: str | None = None, judge_model: str | None = None,
          judge_key: str | None = None, judge_gguf: str | Path | None = None, template: str | None = None,
          questions: Sequence[tuple[str, str]] | None = None, n_questions: int | None = None,
          max_tokens: int = 256, n_ctx: int = 2048, n_threads: int | None = None, progress: bool = True,
          timeout: float = 120.0) -> JudgeReport:
    """komt's protocol: the GGUF ``model`` answers each question greedily in its komt template; the judge scores.

    ``questions`` default to :data:`KOREAN_QUESTIONS`; ``n_questions`` keeps only the first N of them. The judge is
    an OpenAI-compatible endpoint (``judge_url``/``judge_model``), or ``judge_gguf``: a GGUF served on 127.0.0.1 by
    :func:`komt_edge.serve.start` (`komt-edge serve`) for the duration of the run, for fully offline evaluation."""
    if model is None:
        raise KomtError("pass the GGUF file to evaluate: komt-edge bench judge MODEL.gguf --judge-url ...")
    path = Path(model)
    check_model_gguf(path)
    questions = list(questions or KOREAN_QUESTIONS)
    if n_questions:
        questions = questions[:n_questions]
    opts = dict(template=template, questions=questions, max_tokens=max_tokens, n_ctx=n_ctx, n_threads=n_threads,
                progress=progress, timeout=timeout)
    if judge_gguf is None:
        return _judge(path, *judge_settings(judge_url, judge_model, judge_key), **opts)
    if judge_url or os.environ.get("KOMT_JUDGE_URL"):
        raise KomtError("both a judge endpoint and --judge-gguf were given: pass one (unset KOMT_JUDGE_URL to "
                        "use --judge-gguf)")
    check_model_gguf(Path(judge_gguf), "--judge-gguf")
    from ..serve import start  # `komt-edge serve` itself, for the run: one server, whatever it serves

    with GgufHeader(judge_gguf) as header:
        trained = header.u32(f"{header.string('general.architecture')}.context_length") or JUDGE_CTX
    with start(str(judge_gguf), port=0, n_ctx=min(JUDGE_CTX, trained), n_threads=n_threads,
               log=lambda _m: None) as server:
        return _judge(path, server.url + "/v1", Path(judge_gguf).name, None, **opts)


def _judge(path: Path, url: str, jmodel: str, key: str | None, *, template: str | None,
           questions: list[tuple[str, str]], max_tokens: int, n_ctx: int, n_threads: int | None,
           progress: bool, timeout: float) -> JudgeReport:
    from tqdm.auto import tqdm

    # Fail before spending minutes on answers: the endpoint must answer a tiny request.
    post_chat(url, jmodel, [{"role": "user", "content": "점수: 5 라고만 답하세요."}], key=key, timeout=timeout,
              max_tokens=8)
    llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, seed=0)
    try:
        family, tmpl = _prompt_template(path, template)
        answers = []
        for category, question in tqdm(questions, desc="judge", unit="question", disable=not progress):
            t0 = time.perf_counter()
            if tmpl is None:
                out = llm.create_chat_completion(messages=[{"role": "user", "content": question}],
                                                 max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
                answer = (out["choices"][0]["message"]["content"] or "").strip()
            else:
                out = llm.create_completion(tmpl.format(question), max_tokens=max_tokens, temperature=0.0, top_k=1,
                                            repeat_penalty=1.0)
                answer = out["choices"][0]["text"].strip()
            secs = time.perf_counter() - t0
            reply = post_chat(url, jmodel, [{"role": "system", "content": JUDGE_SYSTEM},
                                       {"role": "user", "content": JUDGE_PROMPT.format(question=question,
                                                                                       answer=answer)}],
                         key=key, timeout=timeout)
            score = parse_score(reply)
            answers.append(JudgedAnswer(category, question, answer, score or 0, score is not None, reply, secs))
    finally:
        llm.close()
    return JudgeReport(str(path), family, url, jmodel, answers, environment())
