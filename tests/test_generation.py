"""komt_edge.generation: the linear-time streaming path of chat and serve gives llama-cpp-python's unstreamed text,
byte for byte — for Korean byte-fallback tokens, stop strings that span tokens, length cuts, seeded sampling and
logit_bias — and stops within one token when cancelled."""

from __future__ import annotations

import pytest

from komt_edge.generation import TextAssembler
from komt_edge.runtime import load
from komt_edge.tiny import DEMO_QA

from .conftest import N_THREADS
from .test_chat import korean_gguf  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def random_gguf(tiny_mistral, tmp_path_factory):
    """Random weights, greedy: long replies with no EOS, byte-fallback tokens now and then."""
    from komt_edge.gguf import convert

    return convert(tiny_mistral, ["q8_0"], tmp_path_factory.mktemp("random"), template="mistral", name="random",
                   n_threads=N_THREADS, progress=False)[0]


def llama(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=2048, n_threads=N_THREADS, verbose=False)


def streamed(generation) -> tuple[list[str], str]:
    pieces = list(generation)
    assert "".join(pieces) == generation.text
    return pieces, generation.text


@pytest.mark.parametrize("byte_bias", [0.0, 2.0])
def test_pieces_are_llama_cpp_unstreamed_text_with_stops_lengths_and_bytes(random_gguf, byte_bias):
    """byte_bias raises the 256 byte-fallback tokens (ids 3-258): a third of the reply is then single bytes, lead
    bytes of unfinished characters and invalid sequences, the hardest input for incremental decoding."""
    model, ref = load(random_gguf, n_threads=N_THREADS), llama(random_gguf)
    try:
        prompt = "한국어로 대답해 주세요: 서울은"
        tokens = ref.tokenize(prompt.encode(), add_bos=True, special=True)
        bias = {i: byte_bias for i in range(3, 259)} if byte_bias else None
        full = ref.create_completion(tokens, temperature=0, max_tokens=400, logit_bias=bias)
        text = full["choices"][0]["text"]
        assert full["usage"]["completion_tokens"] >= 400 and len(text) > 200
        # stop strings cut mid-reply (several characters, so most span two or more tokens), one that never occurs,
        # two found at once (the first listed wins), and one that is the start of a later one
        cases = [[text[90:94]], [text[200:203], text[150:152]], ["never-in-the-text"], [text[180:185], text[180:182]],
                 ["\n\n\n\n"], [text[10:11]]]
        for stop in cases:
            for max_tokens in (37, 400):
                want = ref.create_completion(tokens, temperature=0, max_tokens=max_tokens, stop=stop, logit_bias=bias)
                got = model.complete(prompt, temperature=0, max_tokens=max_tokens, stop=stop, logit_bias=bias)
                pieces, joined = streamed(got)
                assert joined == want["choices"][0]["text"], (stop, max_tokens)
                assert got.finish_reason == want["choices"][0]["finish_reason"], (stop, max_tokens)
                assert got.usage() == want["usage"], (stop, max_tokens)
                assert all("\ufffd" not in p for p in pieces)
                assert not any(s and s in joined for s in stop)
        for max_tokens in range(1, 61):  # every cut: some land while an unfinished character defers the checks
            want = ref.create_completion(tokens, temperature=0, max_tokens=max_tokens, logit_bias=bias)
            got = model.complete(prompt, temperature=0, max_tokens=max_tokens, logit_bias=bias)
            assert (got.run(), got.usage()) == (want["choices"][0]["text"], want["usage"]), max_tokens
    finally:
        model.close()
        ref.close()


def test_chat_with_seeded_sampling_and_logit_bias_equals_llama_cpp(korean_gguf):
    model, ref = load(korean_gguf, n_threads=N_THREADS), llama(korean_gguf)
    try:
        ref.chat_handler = model.llm.chat_handler  # the same komt template and BOS rule
        messages = [{"role": "user", "content": DEMO_QA[0][0]}]
        greedy = ref.create_chat_completion(messages, temperature=0, stop=model.stop)
        answer = greedy["choices"][0]["message"]["content"]
        first = ref.tokenize(answer.encode(), add_bos=False, special=False)[0]
        for fields in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}, {"temperature": 1.5, "seed": 3},
                       {"temperature": 0, "logit_bias": {first: -100.0}}, {"temperature": 0, "max_tokens": 9}):
            want = ref.create_chat_completion(messages, stop=model.stop, **fields)
            got = model.chat(messages, stop=model.stop, **fields)
            pieces, text = streamed(got)
            assert text == want["choices"][0]["message"]["content"], fields
            assert got.finish_reason == want["choices"][0]["finish_reason"], fields
            assert all("\ufffd" not in p for p in pieces)
        assert streamed(model.chat(messages, stop=model.stop, temperature=0))[1] == answer
        assert answer.startswith(DEMO_QA[0][1][:20])
    finally:
        model.close()
        ref.close()


def test_cancel_ends_generation_within_one_token(random_gguf):
    model = load(random_gguf, n_threads=N_THREADS)
    try:
        asked = []

        def cancelled() -> bool:
            asked.append(generation.completion_tokens)
            return len(asked) > 5

        generation = model.complete("안녕", temperature=0, max_tokens=1500, cancelled=cancelled)
        generation.run()
        assert generation.completion_tokens == 5 and generation.finish_reason == "stop"
    finally:
        model.close()


@pytest.mark.parametrize("chunks, stop, want, done", [
    ([b"ab", b"c<", b"/s", b">d"], ["</s>"], ["ab", "c", "", ""], True),  # held back while it may become </s>
    ([b"ab", b"c<", b"x"], ["</s>"], ["ab", "c", "<x"], False),  # released once it cannot
    (["봄".encode()[:1], "봄".encode()[1:2], "봄".encode()[2:], b"!"], [], ["", "", "봄", "!"], False),
    # a lead byte at the end defers the checks by as many tokens as bytes are missing (llama-cpp-python's rule)
    ([b"ab", "봄".encode()[:1], "봄".encode()[1:2], "봄".encode()[2:]], [], ["ab", "", "", "봄"], False),
    ([b"ab", "봄".encode()[:1], b"</s>", b"x"], ["</s>"], ["ab", "", "", ""], True),  # found one token late
])
def test_text_assembler_holds_back_only_stop_prefixes_and_partial_characters(chunks, stop, want, done):
    text = TextAssembler(stop)
    got = [text.push(c) for c in chunks]
    assert [g[0] for g in got] == want and got[-1][1] is done


def test_sliding_window_cache_is_reused_only_while_it_holds_the_window(tiny_gemma3, tmp_path):
    """runtime.load keeps only the window in a Gemma 3 model's sliding-window cache (llama-server's setting). A
    next prompt that shares a prefix the window has moved past must be evaluated whole — llama-cpp-python's prefix
    reuse would attend to keys that are gone — and its reply is then that of a fresh model on the same prompt. (The
    cache holds the window plus a batch, 64 + 512 cells: 920 positions make it drop old ones.)"""
    import llama_cpp

    from komt_edge.generation import end_of_generation_ids, generate
    from komt_edge.gguf import convert

    path = convert(tiny_gemma3, ["f16"], tmp_path, name="swa", n_threads=N_THREADS, progress=False)[0]
    model = load(path, n_ctx=2048, n_threads=N_THREADS, template="mistral")
    fresh = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=N_THREADS, swa_full=False, verbose=False)
    try:
        window = llama_cpp.llama_model_n_swa(model.llm.model)
        assert window == 64
        bias = {i: -100.0 for i in end_of_generation_ids(model.llm)}
        first = model.llm.tokenize(("서울의 봄은 따뜻하고 " * 20).encode(), add_bos=True, special=True)[:120]
        generate(model.llm, first, max_tokens=800, temperature=0, logit_bias=bias).run()
        kept_from = llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(model.llm.ctx), 0)
        shared = 100
        assert kept_from > shared - window  # the window has moved past the shared prefix: the case under test
        second = first[:shared] + model.llm.tokenize("부산의 여름은".encode(), add_bos=False, special=True)
        got = generate(model.llm, second, max_tokens=40, temperature=0, logit_bias=bias).run()
        want = generate(fresh, second, max_tokens=40, temperature=0, logit_bias=bias).run()
        # the tokens, not only the text: this random model's replies may decode to little text
        assert model.llm.input_ids[:model.llm.n_tokens].tolist() == fresh.input_ids[:fresh.n_tokens].tolist()
        assert fresh.n_tokens == len(second) + 39 and got == want
    finally:
        model.close()
        fresh.close()
