"""`komt-edge serve`: the OpenAI-compatible API (through the real `openai` client), the Korean chat page (in a real
headless Chromium), and Korean that never breaks in a stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from komt_edge.serve import start
from komt_edge.tiny import DEMO_QA, mistral_tokenizer_model

from .conftest import N_THREADS
from .test_chat import KOMT_STOPS, korean_gguf  # noqa: F401 (fixture)

KEY = "test-key-komt"


@pytest.fixture(scope="module")
def server(korean_gguf):
    with start(str(korean_gguf), port=0, n_threads=N_THREADS, api_key=KEY, log=lambda _m: None) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(korean_gguf):
    """llama-cpp-python itself on the same file: create_chat_completion(messages, temperature=0)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(korean_gguf), n_ctx=2048, n_threads=N_THREADS, verbose=False)
    answers: dict[tuple, str] = {}

    def greedy(question: str, max_tokens: int | None = None) -> str:
        key = (question, max_tokens)
        if key not in answers:
            out = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0,
                                             max_tokens=max_tokens)
            answers[key] = out["choices"][0]["message"]["content"]
        return answers[key]

    yield greedy
    llm.close()


def client(server, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(server, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def sse_pieces(raw: bytes) -> list[str]:
    """The content pieces of a chat stream, each event's bytes decoded strictly (a split character would fail)."""
    pieces = []
    for event in raw.split(b"\n\n"):
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            continue
        chunk = json.loads(event[6:].decode("utf-8", errors="strict"))
        content = chunk["choices"][0].get("delta", {}).get("content") or chunk["choices"][0].get("text")
        if content:
            pieces.append(content)
    assert raw.rstrip().endswith(b"data: [DONE]")
    return pieces


def test_openai_client_chat_equals_llama_cpp_greedy(server, reference):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["komt-tiny-Q8_0"]
    question = DEMO_QA[0][0]
    reply = c.chat.completions.create(model="komt-tiny-Q8_0", messages=[{"role": "user", "content": question}],
                                      temperature=0)
    assert reply.choices[0].message.content == reference(question)
    assert reply.choices[0].message.content.startswith(DEMO_QA[0][1][:20])
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 10
    stream = c.chat.completions.create(model="komt-tiny-Q8_0", messages=[{"role": "user", "content": question}],
                                       temperature=0, stream=True)
    pieces = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 10 and "".join(pieces) == reference(question)


def test_completions_endpoint(server, korean_gguf):
    from llama_cpp import Llama

    prompt = "[INST]" + DEMO_QA[0][0] + " [/INST]"
    got = client(server).completions.create(model="x", prompt=prompt, temperature=0, max_tokens=12).choices[0].text
    llm = Llama(model_path=str(korean_gguf), n_ctx=2048, n_threads=N_THREADS, verbose=False)
    assert got == llm.create_completion(prompt, temperature=0, max_tokens=12)["choices"][0]["text"]
    llm.close()
    status, raw = post(server, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 12,
                                                   "stream": True})
    assert status == 200 and "".join(sse_pieces(raw)) == got


def test_two_concurrent_clients_get_their_own_answers(server, reference):
    questions = [DEMO_QA[0][0], DEMO_QA[2][0]]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client(server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": questions[i]}], temperature=0, stream=True)
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {0: reference(questions[0]), 1: reference(questions[1])}


@pytest.fixture(scope="module")
def random_server(tiny_mistral, tmp_path_factory):
    """Random weights: greedy replies run to max_tokens without EOS, long enough to leave in the middle of."""
    from komt_edge.gguf import convert

    path = convert(tiny_mistral, ["q8_0"], tmp_path_factory.mktemp("random"), template="mistral", name="random",
                   n_threads=N_THREADS, progress=False)[0]
    with start(str(path), port=0, n_threads=N_THREADS, log=lambda _m: None) as srv:
        yield srv


def test_parallel_2_answers_two_overlapping_streams_each_its_own(random_server):
    """--parallel 2: two streams generate at the same time (both copies busy at once, their pieces interleaved in
    time), and each gets exactly llama-cpp-python's unstreamed completion of its own prompt."""
    import time

    from llama_cpp import Llama

    prompts = ["한국의 수도는", "봄에는 꽃이"]
    path = random_server.pool.first.path
    ref = Llama(model_path=str(path), n_ctx=2048, n_threads=N_THREADS, verbose=False)
    want = [ref.create_completion(ref.tokenize(p.encode(), add_bos=True, special=True), temperature=0,
                                  max_tokens=400)["choices"][0]["text"] for p in prompts]
    ref.close()
    with start(str(path), port=0, n_threads=N_THREADS, parallel=2, log=lambda _m: None) as srv:
        got: dict[int, list[tuple[float, str]]] = {0: [], 1: []}
        busy = []

        def ask(i: int) -> None:
            req = urllib.request.Request(srv.url + "/v1/completions", method="POST", headers={
                "Content-Type": "application/json"}, data=json.dumps(
                {"prompt": prompts[i], "temperature": 0, "max_tokens": 400, "stream": True}).encode())
            with urllib.request.urlopen(req, timeout=300) as resp:
                for line in resp:
                    if line.startswith(b"data: {"):
                        text = json.loads(line[6:])["choices"][0]["text"]
                        if text:
                            got[i].append((time.monotonic(), text))
                            if len(got[i]) == 50:
                                busy.append(health(srv)["busy"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert ["".join(p for _t, p in got[i]) for i in range(2)] == want
    assert 2 in busy  # both copies were generating at once
    (start0, end0), (start1, end1) = [(got[i][0][0], got[i][-1][0]) for i in range(2)]
    assert start0 < end1 and start1 < end0  # the two streams overlapped in time


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=60) as resp:
        return json.loads(resp.read())


def wait_until(condition, what: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot_at_once(random_server, stream):
    """A real dropped connection, in the middle of a 1,800-token reply: the generation ends (a few tokens later, not
    1,800), the only model copy is free again and the next request is answered."""
    import socket
    from urllib.parse import urlsplit

    model = random_server.pool.first
    body = json.dumps({"prompt": "안녕하세요", "temperature": 0, "max_tokens": 1800, "stream": stream}).encode()
    url = urlsplit(random_server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream:
        seen = b""
        while seen.count(b"data: ") < 3:  # the reply is streaming
            seen += sock.recv(4096)
    else:
        wait_until(lambda: health(random_server)["busy"] == 1, "the request never started")
        wait_until(lambda: model.llm.n_tokens > 20, "no tokens were generated")
    sock.close()
    wait_until(lambda: health(random_server)["busy"] == 0, "the slot was not freed")
    generated = model.llm.n_tokens - len(model.llm.tokenize("안녕하세요".encode(), add_bos=True, special=True))
    assert generated < 600, generated  # cancelled within a few tokens of the drop, not at the end of the reply
    status, raw = post(random_server, "/v1/completions", {"prompt": "서울", "temperature": 0, "max_tokens": 5})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 5


def test_korean_never_breaks_in_a_stream(server, reference):
    """Every cut of the greedy answer (max_tokens 1..N) crosses byte-fallback tokens somewhere: each SSE event
    decodes strictly, holds no U+FFFD, and the pieces add up to the non-streamed reply."""
    import sentencepiece as spm

    question = DEMO_QA[0][0]
    full = reference(question)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_model()))
    assert sum(p.startswith("<0x") for p in sp.encode(full, out_type=str)) >= 6  # 봄, 겨, 뚜렷: byte tokens
    for max_tokens in range(1, 41):
        body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens}
        status, raw = post(server, "/v1/chat/completions", {**body, "stream": True})
        assert status == 200, raw
        pieces = sse_pieces(raw)
        assert all("\ufffd" not in p for p in pieces)
        status, whole = post(server, "/v1/chat/completions", body)
        text = json.loads(whole)["choices"][0]["message"]["content"]
        assert "".join(pieces) == text == reference(question, max_tokens), max_tokens
        assert "\ufffd" not in text and full.startswith(text)


@pytest.mark.parametrize("body, needle", [
    (b"{not json", ""),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "안녕"}]}, "role"),
    ({"messages": [{"role": "user", "content": "안녕"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "안녕"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "한국어 " * 3000}]}, "context window"),
    ({"messages": [{"role": "user", "content": "안녕"}], "logit_bias": {"안녕": 5}}, "not a token id"),
    ({"messages": [{"role": "user", "content": "안녕"}], "logit_bias": {"99999999": 5}}, "not a token id"),
    ({"messages": [{"role": "user", "content": "안녕"}], "logit_bias": {"5": 500}}, "from -100 to 100"),
])
def test_malformed_requests_get_a_4xx_json_error(server, body, needle):
    status, raw = post(server, "/v1/chat/completions", body)
    assert 400 <= status < 500, raw
    error = json.loads(raw)["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_is_named(server):
    """curl -d and urllib send form-encoded bodies by default: the error says to send JSON."""
    req = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                 data=b'{"messages": [{"role": "user", "content": "hi"}]}',
                                 headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=60)
    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == 415 and "Content-Type: application/json" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]


def test_api_key_is_required_on_v1_routes(server):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        client(server, key="wrong").models.list()
    status, raw = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "안녕"}]}, key=None)
    assert status == 401 and "Bearer" in json.loads(raw)["error"]["message"]
    with urllib.request.urlopen(server.url + "/health") as resp:  # health and the page stay open
        assert json.loads(resp.read())["auth"] is True


def test_page_is_one_offline_utf8_file(server):
    with urllib.request.urlopen(server.url + "/") as resp:
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        html = resp.read().decode("utf-8")
    assert "보내기" in html and "중지" in html and "온도" in html and "최대 토큰" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # nothing from a network


def test_serve_command_binds_loopback_and_stops_on_sigterm(korean_gguf):
    proc = subprocess.Popen([sys.executable, "-m", "komt_edge.cli", "serve", str(korean_gguf), "--port", "0",
                             "-t", str(N_THREADS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not any("OpenAI API" in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        url = next(line.split()[-1] for line in lines if "chat page" in line).rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/health") as resp:
            assert json.loads(resp.read())["model"] == "komt-tiny-Q8_0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# --- the chat page in a real browser ---------------------------------------------------------------------

def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromium-driver are missing: run `make install` (apt-get install chromium "
                    "chromium-driver)")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_chat_page_streams_the_greedy_answer_in_a_real_browser(server, reference, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = DEMO_QA[0][0]
    driver = browser()
    try:
        driver.get(server.url + "/")
        for field, value in (("temperature", "0"), ("max-tokens", "200"), ("api-key", KEY)):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys(question)
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 120).until(
            lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                            if e.get_attribute("data-state") not in (None, "streaming")), None))
        assert answer.get_attribute("data-state") == "done"
        text = answer.get_attribute("textContent")
        assert text == reference(question) and text.startswith("한국은")
        assert int(answer.get_attribute("data-chunks")) > 10  # it arrived piece by piece
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").get_attribute("textContent") == question
        assert "\ufffd" not in driver.find_element(By.ID, "log").get_attribute("textContent")
        # as a Korean reader sees it: every Hangul syllable of the answer is drawn, in the answer's own font, as a
        # glyph of its own; a missing font draws them all as the same empty box
        syllables = sorted({c for c in text if "가" <= c <= "힣"})
        assert len(syllables) >= 10
        assert distinct_glyphs(driver, answer, syllables) == len(syllables)
        driver.save_screenshot(str(tmp_path / "chat-page.png"))
    finally:
        driver.quit()


def distinct_glyphs(driver, element, chars: list[str]) -> int:
    """How many different pictures ``chars`` make when drawn in ``element``'s computed font."""
    return driver.execute_script("""
        const [element, chars] = arguments;
        const style = getComputedStyle(element), canvas = document.createElement("canvas");
        canvas.width = canvas.height = 64;
        const ctx = canvas.getContext("2d");
        ctx.font = `${style.fontWeight} 40px ${style.fontFamily}`;
        const seen = new Set();
        for (const c of chars) {
          ctx.clearRect(0, 0, 64, 64);
          ctx.fillText(c, 4, 48);
          seen.add(Array.from(ctx.getImageData(0, 0, 64, 64).data).join(","));
        }
        return seen.size;""", element, chars)


def test_the_page_stop_button_ends_the_generation(random_server):
    """Stop, in the browser: the reply stops where it was, and the server stops generating (a real aborted fetch)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = random_server.pool.first
    driver = browser()
    try:
        driver.get(random_server.url + "/")
        for field, value in (("temperature", "0"), ("max-tokens", "1800")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        # the page itself clicks stop at the sixth piece: a click from here could land after a fast reply's end
        driver.execute_script("""
            new MutationObserver((_changes, observer) => {
              const answer = document.querySelector(".msg.assistant");
              if (answer && Number(answer.dataset.chunks) > 5) { observer.disconnect(); document.getElementById("stop").click(); }
            }).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true,
                                                        attributes: true});""")
        driver.find_element(By.ID, "input").send_keys("안녕하세요")
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 120).until(lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
             if e.get_attribute("data-state") not in (None, "streaming")), None))
        assert answer.get_attribute("data-state") == "stopped" and int(answer.get_attribute("data-chunks")) > 5
        wait_until(lambda: health(random_server)["busy"] == 0, "the slot was not freed")
        prompt = len(model.llm.tokenize(b"x", add_bos=True, special=True))
        assert model.llm.n_tokens - prompt < 1200  # stopped well before the 1,800 tokens it was asked for
        assert driver.find_element(By.ID, "send").is_enabled()
    finally:
        driver.quit()
