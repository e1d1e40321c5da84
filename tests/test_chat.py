"""`komt-edge chat` and the model selection it shares with `serve` (komt_edge.runtime)."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest

from komt_edge.errors import KomtError
from komt_edge.runtime import candidates, choose, load, resolve_gguf
from komt_edge.templates import MISTRAL
from komt_edge.tiny import DEMO_QA

from .conftest import N_THREADS, assert_one_line_error, run_cli
from .hub_server import ORG, hub  # noqa: F401 (fixture)

KOMT_STOPS = ["</s>", "[INST]"]


@pytest.fixture(scope="session")
def korean_gguf(tiny_mistral, mistral_adapter, tmp_path_factory):
    """The demo's model: tiny komt-mistral + the adapter that answers DEMO_QA in Korean, as a q8_0 GGUF with the
    komt template. Its answers cross byte-fallback tokens (봄, 겨, 뚜렷 are bytes in Mistral's vocabulary)."""
    from komt_edge.gguf import convert
    from komt_edge.merge import merge

    root = tmp_path_factory.mktemp("korean")
    merge(tiny_mistral, mistral_adapter, root / "merged")
    return convert(root / "merged", ["q8_0"], root, template="mistral", name="komt-tiny", n_threads=N_THREADS,
                   progress=False)[0]


def greedy_reference(path, prompt: str, *, n_ctx: int = 2048) -> str:
    """llama-cpp-python's greedy completion of a formatted prompt after BOS, as verify and llama-cli run komt."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=N_THREADS, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        assert tokens[0] == llm.token_bos() and tokens[1] != llm.token_bos()
        return llm.create_completion(tokens, temperature=0, max_tokens=None, stop=KOMT_STOPS)["choices"][0]["text"]
    finally:
        llm.close()


def chat_lines(monkeypatch, capsys, *args: str, lines: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    return run_cli(monkeypatch, capsys, "chat", *args, "-t", str(N_THREADS))


def test_scripted_chat_is_greedy_llama_cpp_turn_by_turn(korean_gguf, monkeypatch, capsys):
    q1, q2 = DEMO_QA[0][0], DEMO_QA[2][0]
    code, out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--temperature", "0", lines=[q1, q2])
    assert code == 0, err
    a1 = greedy_reference(korean_gguf, MISTRAL.format(q1))
    assert a1.startswith(DEMO_QA[0][1][:20])  # the Korean answer the adapter taught
    # turn 2 is formatted by the template stored in the file: turn 1 and its answer, closed by </s>
    a2 = greedy_reference(korean_gguf, MISTRAL.format(q1) + a1 + "</s>" + MISTRAL.format(q2))
    assert out == f"{a1}\n{a2}\n"
    assert "\ufffd" not in out


def test_chat_prompts_start_with_one_bos_whatever_the_stored_template(korean_gguf):
    """komt was trained after BOS, and llama-cpp-python's chat formatter adds none: komt's template renders it, and
    for a template that does not (komt-edge's own before it did, other models' templates) the runtime adds it."""
    model = load(korean_gguf, n_threads=N_THREADS)
    try:
        messages = [{"role": "user", "content": DEMO_QA[0][0]}]
        want = model.llm.tokenize(MISTRAL.format(DEMO_QA[0][0]).encode("utf-8"), add_bos=True, special=True)
        assert want[0] == model.llm.token_bos()
        assert model.prompt_token_ids(messages) == want
        legacy = dataclasses.replace(model, chat_template=MISTRAL.chat_template.removeprefix("{{ bos_token }}"))
        assert legacy.formatter(messages=messages).prompt == MISTRAL.format(DEMO_QA[0][0])
        assert legacy.prompt_token_ids(messages) == want
    finally:
        model.close()


def test_template_override_and_system_prompt(korean_gguf, monkeypatch, capsys):
    q = DEMO_QA[1][0]
    code, out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--template", "llama",
                                "--system", "간결하게", "--temperature", "0", "--max-tokens", "12", lines=[q])
    assert code == 0, err
    from llama_cpp import Llama

    llm = Llama(model_path=str(korean_gguf), n_ctx=2048, n_threads=N_THREADS, verbose=False)
    tokens = llm.tokenize(("간결하게\n\n### instruction: " + q + "\n\n### Response: ").encode(), add_bos=True,
                          special=True)
    ref = llm.create_completion(tokens, temperature=0, max_tokens=12, stop=["</s>", "### instruction:"])
    llm.close()
    assert out == ref["choices"][0]["text"] + "\n"


def test_context_overflow_drops_the_oldest_turns_once(korean_gguf, monkeypatch, capsys):
    questions = [DEMO_QA[0][0], DEMO_QA[2][0], DEMO_QA[0][0], DEMO_QA[2][0]]
    code, out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--ctx", "256", "--max-tokens", "48",
                                "--temperature", "0", lines=questions)
    assert code == 0, err
    assert out.count("\n") == 4  # one reply per line (a reply may hold a \r)
    assert err.count("oldest turns are dropped") == 1, err


def test_the_system_prompt_stays_when_old_turns_are_dropped(korean_gguf):
    """The prompts actually generated from, turn by turn: the oldest turns go, the system prompt never does."""
    from komt_edge.chat import ChatSession, Sampling

    model = load(korean_gguf, n_ctx=256, n_threads=N_THREADS)
    sent, chat = [], model.chat
    model.chat = lambda messages, **kw: (sent.append(messages), chat(messages, **kw))[1]
    notices = []
    try:
        session = ChatSession(model, system="간결하게 대답하세요.", sampling=Sampling(temperature=0, max_tokens=48),
                              log=notices.append)
        for question in [DEMO_QA[0][0], DEMO_QA[2][0], DEMO_QA[0][0], DEMO_QA[2][0]]:
            assert "".join(session.reply(question))
        assert len(notices) == 1 and "dropped" in notices[0]
        assert all(m[0] == {"role": "system", "content": "간결하게 대답하세요."} for m in sent)
        assert len(sent[-1]) < 1 + 2 * 4 - 1  # some turns were dropped from the last prompt, not the system prompt
        assert sent[-1][-1] == {"role": "user", "content": DEMO_QA[2][0]}
    finally:
        model.close()


def test_a_message_longer_than_the_context_is_one_error_line(korean_gguf, monkeypatch, capsys):
    code, _out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--ctx", "256", lines=["한국어 " * 200])
    assert_one_line_error(code, err, "does not fit the context", "--ctx")


@pytest.mark.parametrize("ctx, needles", [("100", ("--ctx 100", "smallest context, 256")),
                                          ("4096", ("--ctx 4096", "trained for (2048 tokens)", "at most 2048"))])
def test_a_context_llama_cpp_would_change_or_overrun_is_refused(korean_gguf, monkeypatch, capsys, ctx, needles):
    code, _out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--ctx", ctx, lines=["안녕"])
    assert_one_line_error(code, err, *needles)


def test_blank_lines_are_no_turns_and_stdin_must_be_utf8(korean_gguf, monkeypatch, capsys):
    code, out, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--temperature", "0", "--max-tokens", "8",
                                lines=["", DEMO_QA[0][0], "   "])
    assert code == 0 and out.count("\n") == 1, (out, err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xed\x95\n"), encoding="utf-8"))
    code, _out, err = run_cli(monkeypatch, capsys, "chat", str(korean_gguf), "-t", str(N_THREADS))
    assert_one_line_error(code, err, "standard input is not UTF-8", "UTF-8 lines")


def test_stream_pieces_are_whole_characters_and_stop_keeps_the_session(korean_gguf):
    from komt_edge.chat import ChatSession, Sampling

    model = load(korean_gguf, n_threads=N_THREADS)
    try:
        session = ChatSession(model, sampling=Sampling(temperature=0), log=lambda _m: None)
        pieces = list(session.reply(DEMO_QA[0][0]))
        full = model.llm.create_chat_completion([{"role": "user", "content": DEMO_QA[0][0]}], temperature=0,
                                                stop=KOMT_STOPS)["choices"][0]["message"]["content"]
        assert len(pieces) > 10 and "".join(pieces) == full
        assert all("\ufffd" not in p for p in pieces)
        # a stop request (Ctrl-C) ends the reply; what was written stays in the history, the session goes on
        session.reset()
        seen = []
        for piece in session.reply(DEMO_QA[0][0], stop_requested=lambda: len(seen) >= 3):
            seen.append(piece)
        assert len(seen) == 3 and session.history[-1] == {"role": "assistant", "content": "".join(seen)}
        assert "".join(session.reply(DEMO_QA[2][0]))  # the next turn still answers
    finally:
        model.close()


# --- model selection -------------------------------------------------------------------------------------

def test_quant_choice_defaults_and_missing_choice():
    files = {"m-Q2_K.gguf": 10, "m-Q8_0.gguf": 80, "m-Q5_K_M.gguf": 50, "m-Q4_0.gguf": 40,
             "m-korean.imatrix.gguf": 1, "m-F16-00001-of-00002.gguf": 100, "m-F16-00002-of-00002.gguf": 100}
    found = candidates(files)
    assert sorted(found) == ["F16", "Q2_K", "Q4_0", "Q5_K_M", "Q8_0"]  # the imatrix is never a model
    assert found["F16"].files == ["m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf"]
    assert choose(found, None, "repo").quant == "Q4_0"  # the smallest of at least 4 bits
    assert choose(candidates({**files, "m.Q4_K_M.gguf": 45}), None, "repo").quant == "Q4_K_M"
    assert choose(found, "q8_0", "repo").quant == "Q8_0"
    with pytest.raises(KomtError, match="has no Q6_K file; it has: F16, Q2_K, Q4_0, Q5_K_M, Q8_0"):
        choose(found, "Q6_K", "repo")
    with pytest.raises(KomtError, match="4 bits or more; it has: Q2_K"):
        choose(candidates({"m-Q2_K.gguf": 1}), None, "repo")


def test_model_is_a_file_a_folder_or_refused(korean_gguf, tmp_path):
    assert resolve_gguf(str(korean_gguf)) == korean_gguf
    assert resolve_gguf(str(korean_gguf.parent), quant="Q8_0") == korean_gguf
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(KomtError, match="is not a GGUF file"):
        resolve_gguf(str(tmp_path / "notes.gguf"))
    with pytest.raises(KomtError, match="unknown MODEL"):
        resolve_gguf("no-such-model")


def test_hub_gguf_repo_and_zoo_name_download_then_work_offline(korean_gguf, hub, monkeypatch):
    data = korean_gguf.read_bytes()
    repo = f"{ORG}/komt-mistral-7b-v1-GGUF"
    hub.add_repo(repo, {"komt-mistral-7b-v1-Q8_0.gguf": data, "komt-mistral-7b-v1-Q2_K.gguf": b"GGUF small",
                        "komt-mistral-7b-v1-korean.imatrix.gguf": b"GGUF imatrix", "README.md": b"card"})
    path = resolve_gguf(repo)  # default: the only file of at least 4 bits
    assert path.name == "komt-mistral-7b-v1-Q8_0.gguf" and path.read_bytes() == data
    assert resolve_gguf("komt-mistral-7b", org=ORG) == path  # the zoo name means ORG/<name>-GGUF
    with pytest.raises(KomtError, match="has no Q4_K_M file; it has: Q2_K, Q8_0"):
        resolve_gguf(repo, quant="Q4_K_M")
    with pytest.raises(KomtError, match="was not found"):
        resolve_gguf(f"{ORG}/nothing-GGUF")
    from huggingface_hub import constants

    hub.stop()  # the Hub is gone: the cached file is still chosen, without waiting on retries
    logs = []
    assert resolve_gguf(repo, log=logs.append).read_bytes() == data
    assert "local cache" in logs[0]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and with HF_HUB_OFFLINE=1
    assert resolve_gguf(repo, log=logs.append).read_bytes() == data


def test_interactive_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_mistral, tmp_path):
    """In a terminal (a pty): Ctrl-C stops a reply being written, the session goes on; /reset, /exit."""
    import os
    import pty
    import select
    import time

    from komt_edge.gguf import convert

    # random weights, greedy: thousands of tokens without EOS, so the reply is still being written at Ctrl-C
    model = convert(tiny_mistral, ["q8_0"], tmp_path, template="mistral", name="random", n_threads=N_THREADS,
                    progress=False)[0]
    pid, fd = pty.fork()
    if pid == 0:  # the child: komt-edge chat on the pty
        os.execv(sys.executable, [sys.executable, "-m", "komt_edge.cli", "chat", str(model), "--temperature", "0",
                                  "--ctx", "2048", "-t", str(N_THREADS)])
    seen = b""

    def read_until(needle: bytes, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            assert time.monotonic() < deadline, seen.decode("utf-8", errors="replace")[-500:]
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert needle in seen, seen.decode("utf-8", errors="replace")[-500:]

    try:
        read_until(b"\n> ")
        os.write(fd, "안녕하세요\n".encode())
        read_until("안녕하세요\r\n".encode())
        start, deadline = len(seen), time.monotonic() + 120
        while len(seen) - start < 40:  # the reply is streaming
            assert time.monotonic() < deadline, "no reply was streamed"
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096)
        os.write(fd, b"\x03")  # Ctrl-C
        read_until(b"[stopped]")
        read_until(b"\n> ", timeout=60)
        os.write(fd, b"/reset\n")
        read_until(b"(conversation cleared)")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, seen[-500:]
        assert "\ufffd" not in seen.decode("utf-8")  # what reached the terminal is whole characters
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_lora_gguf_applies_on_top_of_the_base(tiny_mistral, mistral_adapter, korean_gguf, tmp_path, monkeypatch,
                                              capsys):
    """--lora: the adapter as llama.cpp's LoRA GGUF (komt-edge gguf-lora) on the base's GGUF answers like the
    merged file does."""
    from komt_edge.gguf import convert
    from komt_edge.gguf_lora import gguf_lora

    base = convert(tiny_mistral, ["q8_0"], tmp_path, template="mistral", name="base", n_threads=N_THREADS,
                   progress=False)[0]
    lora = gguf_lora(mistral_adapter, tmp_path, base=str(tiny_mistral), progress=False, log=lambda _m: None).path
    code, out, err = chat_lines(monkeypatch, capsys, str(base), "--lora", str(lora), "--temperature", "0",
                                "--max-tokens", "12", lines=[DEMO_QA[0][0]])
    assert code == 0, err
    assert out.startswith(DEMO_QA[0][1][:8])
    code, merged, err = chat_lines(monkeypatch, capsys, str(korean_gguf), "--temperature", "0", "--max-tokens", "12",
                                   lines=[DEMO_QA[0][0]])
    assert out == merged


def test_an_adapter_for_another_base_is_refused_before_loading(tiny_mistral, tiny_llama, llama_adapter, tmp_path,
                                                               monkeypatch, capsys):
    """llama.cpp would crash (SIGSEGV) on an adapter whose shapes do not fit: chat and serve refuse it first."""
    from komt_edge.gguf import convert
    from komt_edge.gguf_lora import gguf_lora
    from komt_edge.serve import start

    base = convert(tiny_mistral, ["q8_0"], tmp_path, template="mistral", name="base", n_threads=N_THREADS,
                   progress=False)[0]
    other = gguf_lora(llama_adapter, tmp_path, base=str(tiny_llama), progress=False, log=lambda _m: None).path
    code, _out, err = chat_lines(monkeypatch, capsys, str(base), "--lora", str(other), lines=["안녕"])
    assert_one_line_error(code, err, other.name, "does not fit", "blk.0.attn_k.weight", "--base")
    with pytest.raises(KomtError, match="does not fit"):
        start(str(base), port=0, n_threads=N_THREADS, lora=str(other), log=lambda _m: None)
    code, _out, err = chat_lines(monkeypatch, capsys, str(base), "--lora", str(tmp_path / "missing.gguf"),
                                 lines=["안녕"])
    assert_one_line_error(code, err, "missing.gguf does not exist", "gguf-lora")
