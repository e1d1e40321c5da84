"""`komt-edge bench`: harness correctness on tiny models, outputs, the judge against a local server, bad inputs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from komt_edge import bench
from komt_edge.errors import KomtError

from .conftest import N_THREADS, assert_one_line_error, run_cli

N_CTX = 128
CHUNKS = 3


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_mistral, tmp_path_factory) -> dict[str, Path]:
    from komt_edge.gguf import convert

    out = tmp_path_factory.mktemp("bench")
    paths = convert(str(tiny_mistral), ["f32", "q8_0", "q4_0"], out, n_threads=1, progress=False)
    return dict(zip(["f32", "q8_0", "q4_0"], paths))


@pytest.fixture(scope="module")
def quality_report(tiny_ggufs):
    files = [tiny_ggufs["f32"], tiny_ggufs["q8_0"], tiny_ggufs["q4_0"]]
    return bench.quality(files, tiny_ggufs["f32"], n_ctx=N_CTX, n_chunks=CHUNKS, n_threads=N_THREADS,
                         progress=False)


def test_kl_of_a_file_against_itself_is_zero(quality_report):
    same = quality_report.results[0]
    assert same.kl.mean_kld == pytest.approx(0.0, abs=1e-7)
    assert same.kl.max_kld == pytest.approx(0.0, abs=1e-6)
    assert same.kl.same_top == 1.0
    assert same.kl.ppl_ratio == pytest.approx(1.0, abs=1e-9)
    assert same.kl.delta_ppl == pytest.approx(0.0, abs=1e-6)
    assert same.tokens == CHUNKS * (N_CTX - 1 - N_CTX // 2)  # llama-perplexity scores the second half


def test_q4_0_loses_more_than_q8_0(quality_report):
    _, q8, q4 = quality_report.results
    assert 0 < q8.kl.mean_kld < q4.kl.mean_kld
    assert q8.kl.same_top > q4.kl.same_top
    assert q4.kl.p99_kld <= q4.kl.max_kld
    assert q8.kl.median_kld <= q8.kl.p99_kld
    assert abs(np.log(q8.kl.ppl_ratio)) < abs(np.log(q4.kl.ppl_ratio)) + 0.05
    # the reference's perplexity, seen from each comparison, is the f32 file's own
    assert q8.kl.ppl_base == pytest.approx(quality_report.results[0].ppl, rel=1e-9)


def test_perplexity_equals_an_independent_computation_from_hf_logits(tiny_mistral, tiny_ggufs, quality_report):
    """Same tokens, same chunking (BOS first, second half scored), logits from transformers instead of llama.cpp."""
    from transformers import AutoModelForCausalLM

    body, _ = bench.korean_eval_text(None)
    with bench.LlamaRunner(tiny_ggufs["f32"], n_ctx=N_CTX, n_threads=N_THREADS) as r:
        tokens, bos = r.tokenize(body), r.bos
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    nll = []
    half = N_CTX // 2
    for c in range(CHUNKS):
        chunk = torch.tensor(tokens[c * N_CTX:(c + 1) * N_CTX], dtype=torch.long)
        chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
        pos = torch.arange(half, N_CTX - 1)
        nll.append(-logp[pos, chunk[pos + 1]])
    ppl_hf = float(torch.exp(torch.cat(nll).mean()))
    assert quality_report.results[0].ppl == pytest.approx(ppl_hf, rel=1e-3)


def test_files_that_do_not_fit_together_are_compared_in_groups(tiny_ggufs, quality_report):
    from komt_edge.bench.quality import _plan_groups

    assert _plan_groups([5, 5, 5], 5, 20) == [[0, 1, 2]]
    assert _plan_groups([5, 5, 5], 5, 12) == [[0], [1], [2]]
    files = [tiny_ggufs["q8_0"], tiny_ggufs["q4_0"]]
    grouped = bench.quality(files, tiny_ggufs["f32"], n_ctx=N_CTX, n_chunks=CHUNKS, n_threads=N_THREADS,
                            progress=False, memory_budget=1)  # the reference is re-run for each file
    for g, r in zip(grouped.results, quality_report.results[1:]):
        assert g.ppl == r.ppl and g.kl.mean_kld == r.kl.mean_kld


def test_a_text_file_is_scored_as_llama_perplexity_reads_it(tiny_ggufs, tmp_path):
    """llama-perplexity -f scores a file's characters as they are, less one final newline: Windows line ends stay
    \\r\\n. The scorer once read --text in Python's text mode, which turns them into \\n: other tokens, and on a
    CRLF Korean file (konlpy's constitution.txt, 4 chunks of 512) Gemma 3's F16 read PPL 10.3993 against
    llama-perplexity's 9.4755."""
    body, _ = bench.korean_eval_text(None)
    raw = body.replace("\n", "\r\n") + "\r\n"  # llama.cpp drops the final "\n" and keeps the "\r"
    path = tmp_path / "crlf.txt"
    path.write_bytes(raw.encode("utf-8"))
    assert bench.korean_eval_text(path)[0] == raw[:-1]
    f32 = tiny_ggufs["f32"]
    report = bench.quality([f32], text=path, n_ctx=N_CTX, n_chunks=CHUNKS, n_threads=N_THREADS, progress=False)
    half = N_CTX // 2  # the same protocol, on llama.cpp's tokens of the file's characters
    nll = []
    with bench.LlamaRunner(f32, n_ctx=N_CTX, n_threads=N_THREADS) as r:
        tokens = r.tokenize(raw[:-1])
        for c in range(CHUNKS):
            chunk = tokens[c * N_CTX:(c + 1) * N_CTX].copy()
            chunk[0] = r.bos
            r.clear()
            logits = torch.from_numpy(r.logits(r.decode(chunk, 0, logits_from=half))[:N_CTX - 1 - half].copy())
            logp = torch.log_softmax(logits.double(), -1)
            nll.append(-logp[torch.arange(len(logp)), torch.from_numpy(chunk[half + 1:]).long()])
    assert report.results[0].ppl == pytest.approx(float(torch.exp(torch.cat(nll).mean())), rel=1e-5)


def test_speed_reports_llama_bench_quantities(tiny_ggufs):
    report = bench.speed([tiny_ggufs["q8_0"]], n_prompt=64, n_gen=16, repetitions=2, n_threads=N_THREADS,
                         progress=False)
    (r,) = report.results
    assert r.pp.test == "pp64" and r.tg.test == "tg16"
    assert len(r.pp.samples_ts) == 2 and r.pp.mean > 0 and r.tg.mean > 0 and r.tg.sd >= 0
    assert r.n_threads == N_THREADS
    assert 8.0 < r.file.bpw < 9.0  # q8_0: 8.5 bits for the matrices, f32 norms
    assert 0.5 < r.chars_per_token < 3  # Korean with the Mistral tokenizer: ~0.93
    assert r.bandwidth_bytes_s > 1e8 and r.roofline_tg > 0 and r.roofline_fraction > 0
    info = r.file
    assert info.bytes_per_token < info.tensor_bytes  # the embedding is a lookup
    if not torch.cuda.is_available():
        assert report.cuda and all(c.status == "no GPU" for c in report.cuda)


def test_runners_share_one_loaded_model(tiny_ggufs):
    """speed loads each file once for all its contexts, as llama-bench does: a runner on a shared model computes
    the same logits as one that loads the file itself, and closing it leaves the model usable."""
    toks = [1, 300, 301, 302, 303]
    with bench.LlamaRunner(tiny_ggufs["q8_0"], n_ctx=32, n_threads=N_THREADS) as own:
        own.decode(toks)
        expected = own.logits(1).copy()
    with bench.LlamaModel(tiny_ggufs["q8_0"]) as model:
        for _ in range(2):  # the second runner proves the first did not free the model
            with bench.LlamaRunner(model, n_ctx=32, n_threads=N_THREADS) as r:
                r.decode(toks)
                np.testing.assert_array_equal(r.logits(1), expected)
        assert model.model
    assert model.model is None


def test_outputs_markdown_json_png(quality_report, tiny_ggufs, tmp_path):
    speed = bench.speed([tiny_ggufs["q4_0"]], n_prompt=32, n_gen=8, repetitions=1, n_threads=N_THREADS,
                        bandwidth=False, cuda=False, progress=False)
    md, js, png = bench.write_outputs([quality_report, speed], tmp_path / "bench", title="tiny")
    text = md.read_text(encoding="utf-8")
    assert "| mistral-Q4_0.gguf | Q4_0 |" in text and "mean KLD" in text and "pp32 t/s" in text
    data = json.loads(js.read_text(encoding="utf-8"))
    assert [d["kind"] for d in data] == ["quality", "speed"]
    assert data[0]["env"]["llama_cpp_python"] and data[0]["env"]["cpu_count"]
    assert data[0]["results"][2]["kl"]["mean_kld"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad inputs --------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(KomtError, match="does not exist"):
        bench.quality([tmp_path / "nope.gguf"], progress=False)
    with pytest.raises(KomtError, match="does not exist"):
        bench.speed([tmp_path / "nope.gguf"], progress=False)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(KomtError, match="not a GGUF"):
        bench.quality([bad], progress=False)


def test_reference_with_another_vocabulary(tiny_ggufs, tiny_llama, tmp_path):
    from komt_edge.gguf import convert

    other = convert(str(tiny_llama), ["q8_0"], tmp_path, n_threads=1, progress=False)[0]  # 32001 tokens
    with pytest.raises(KomtError, match="vocabulary"):
        bench.quality([tiny_ggufs["q8_0"]], other, n_ctx=N_CTX, n_chunks=1, n_threads=N_THREADS, progress=False)


def test_text_shorter_than_two_chunks(tiny_ggufs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("대한민국의 수도는 서울입니다.", encoding="utf-8")
    with pytest.raises(KomtError, match="shorter than two chunks"):
        bench.quality([tiny_ggufs["q8_0"]], text=short, n_ctx=N_CTX, n_threads=N_THREADS, progress=False)


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "komt_edge.cli", "bench", "quality", str(tmp_path / "x.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr


# --- judge ---------------------------------------------------------------------------------------------------

def test_parse_score():
    from komt_edge.bench.judge import parse_score

    assert parse_score("정확하고 자연스럽습니다.\n점수: 5") == 5
    assert parse_score("점수 : 3/5") == 3
    assert parse_score("**점수: 4**") == 4
    assert parse_score('{"score": 2}') == 2
    assert parse_score("처음에는 점수: 1 이라고 했지만\n점수: 4") == 4
    assert parse_score("no score here") is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_judge_endpoint(tiny_ggufs):
    from komt_edge.bench import judge

    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(KomtError, match="unreachable"):
        judge(tiny_ggufs["q8_0"], judge_url=url, judge_model="m", progress=False)
    with pytest.raises(KomtError, match="--judge-url"):
        judge(tiny_ggufs["q8_0"], judge_url="", judge_model="m", progress=False)


def test_judge_against_a_local_openai_compatible_server(tiny_ggufs):
    """komt's protocol offline: the tiny model answers in its komt template, `komt-edge serve` as the judge scores."""
    from komt_edge.bench import judge
    from komt_edge.bench.judge import KOREAN_QUESTIONS
    from komt_edge.serve import start

    with start(str(tiny_ggufs["q8_0"]), port=0, n_ctx=1024, n_threads=N_THREADS, log=lambda _m: None) as server:
        report = judge(tiny_ggufs["q4_0"], judge_url=server.url + "/v1", judge_model="local",
                       questions=KOREAN_QUESTIONS[:2], max_tokens=8, n_threads=N_THREADS, progress=False)
    assert report.template == "mistral"  # read from the file's komt chat template
    assert len(report.answers) == 2 and all(a.judge_reply is not None for a in report.answers)
    # a random tiny judge rarely writes "점수: N": whatever it wrote is scored by the parser's rule, unscored as 0
    from komt_edge.bench.judge import parse_score

    for a in report.answers:
        assert (a.parsed, a.score) == ((True, parse_score(a.judge_reply)) if parse_score(a.judge_reply) is not None
                                       else (False, 0))
    assert report.score == sum(a.score for a in report.answers)
    assert "| mistral-Q4_0.gguf |" in report.markdown()
    data = report.to_dict()
    assert data["questions"] == 2 and "점수: N" in data["judge_prompt"]


def test_judge_scores_what_a_scoring_judge_answers(tiny_ggufs):
    """A judge endpoint that does score (a scripted OpenAI-compatible server: 4 points when the prompt carries the
    model's answer, else 1): the scores, their sum, average and percentage are the judge's."""
    import http.server
    import threading

    from komt_edge.bench import judge
    from komt_edge.bench.judge import KOREAN_QUESTIONS

    prompts: list[str] = []

    class Judge(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            prompts.append(prompt)
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "평가.\n점수: 4"}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.encode())))
            self.end_headers()
            self.wfile.write(reply.encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report = judge(tiny_ggufs["q4_0"], judge_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                       judge_model="scripted", questions=KOREAN_QUESTIONS[:3], max_tokens=8, n_threads=N_THREADS,
                       progress=False)
    finally:
        server.shutdown()
        server.server_close()
    graded = [p for p in prompts if "[답변]" in p]  # after judge()'s one probe of the endpoint
    assert len(graded) == 3 and len(prompts) == 4
    for answer, prompt in zip(report.answers, graded):
        assert answer.question in prompt and answer.answer.strip() in prompt  # the judge saw question and answer
        assert (answer.score, answer.parsed) == (4, True)
    assert report.score == 12 and report.average == 4.0 and report.percentage == pytest.approx(80.0)


def test_judge_cli_serves_a_gguf_judge_offline(tiny_ggufs, tmp_path, monkeypatch, capsys):
    """`--judge-gguf` starts the local judge for the run; the report names it; it cannot be combined with a URL."""
    monkeypatch.delenv("KOMT_JUDGE_URL", raising=False)
    out = tmp_path / "judge.json"
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "judge", str(tiny_ggufs["q4_0"]), "--judge-gguf",
                                str(tiny_ggufs["q8_0"]), "--questions", "1", "--max-tokens", "8", "-t", str(N_THREADS),
                                "--json", str(out))
    assert code == 0, err
    assert "| mistral-Q4_0.gguf |" in stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["judge_model"] == "mistral-Q8_0.gguf" and data["judge_url"].startswith("http://127.0.0.1:")
    assert data["questions"] == 1 and data["answers"][0]["judge_reply"] is not None

    code, _, err = run_cli(monkeypatch, capsys, "bench", "judge", str(tiny_ggufs["q4_0"]), "--judge-gguf",
                           str(tiny_ggufs["q8_0"]), "--judge-url", "http://127.0.0.1:9/v1")
    assert_one_line_error(code, err, "--judge-gguf")


# --- gemma3 in the converter: byte-identical to llama.cpp, and runs like transformers -------------------------

# tiny_gemma3: a session fixture (tests/conftest.py), shared with test_layer_reference.py.

def test_gemma3_float_types_match_convert_hf_to_gguf(tiny_gemma3, llama_cpp_ref, tmp_path):
    from komt_edge.gguf import convert

    from .conftest import assert_same_tensors
    from .identity import GEMMA3_EXCEPTIONS, assert_identical

    ours = convert(str(tiny_gemma3), ["f16", "f32"], tmp_path, n_threads=1, progress=False)
    for qtype, path in zip(["f16", "f32"], ours):
        assert_identical(path, llama_cpp_ref.convert(tiny_gemma3, qtype), ignore=GEMMA3_EXCEPTIONS)


def test_gemma3_quantized_types_match_llama_quantize(tiny_gemma3, llama_cpp_ref, tmp_path):
    from komt_edge.gguf import convert

    from .conftest import assert_same_tensors, gguf_field, gguf_tensors
    from .identity import GEMMA3_EXCEPTIONS, assert_identical

    qtypes = ["q8_0", "q4_0", "q4_K_M"]
    ours = convert(str(tiny_gemma3), qtypes, tmp_path, n_threads=1, progress=False)
    source = llama_cpp_ref.convert(tiny_gemma3, "bf16")
    for qtype, path in zip(qtypes, ours):
        assert_identical(path, llama_cpp_ref.quantize(tiny_gemma3, "bf16", qtype), ignore=GEMMA3_EXCEPTIONS)
    tensors = gguf_tensors(ours[0])
    assert "output.weight" not in tensors  # tied: llama.cpp uses the embedding as the output
    # norms are stored as 1 + w (Gemma multiplies by 1 + w)
    ref = gguf_tensors(source)
    assert tensors["blk.0.attn_q_norm.weight"] == ref["blk.0.attn_q_norm.weight"]
    # the gemma3 hyperparameters llama.cpp's converter writes, with the same values
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.freq_base_swa",
                "attention.sliding_window"):
        assert gguf_field(ours[0], f"gemma3.{key}") == gguf_field(source, f"gemma3.{key}"), key
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token",
                "add_space_prefix", "tokens", "scores"):
        assert gguf_field(ours[0], f"tokenizer.ggml.{key}") == gguf_field(source, f"tokenizer.ggml.{key}"), key
    # beyond llama.cpp's converter: <unk> and the user-defined pieces ("\n\n", ...) keep the release's ids/types
    assert gguf_field(ours[0], "tokenizer.ggml.unknown_token_id") == 3
    assert 4 in gguf_field(ours[0], "tokenizer.ggml.token_type")


def test_gemma3_gguf_runs_like_transformers(tiny_gemma3, tmp_path):
    """llama.cpp on the converted f32 file predicts what transformers predicts (norm offsets, rotary layout,
    embedding scale, sliding window, tied output all right), on Korean text."""
    from transformers import AutoModelForCausalLM

    from komt_edge.gguf import convert
    from komt_edge.verify import Bounds, compare_logits

    f32 = convert(str(tiny_gemma3), ["f32"], tmp_path, n_threads=1, progress=False)[0]
    text = "대한민국의 수도는 서울이며, 가장 큰 항구 도시는 부산입니다. " * 2  # > the 64-token sliding window
    with bench.LlamaRunner(f32, n_ctx=512, n_threads=N_THREADS) as r:
        ids = r.tokenize(text)
        r.decode(ids, 0, logits_from=0)
        ours = r.logits(len(ids)).copy()
    assert len(ids) > 64
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0].numpy()
    parity = compare_logits(ref, ours, Bounds(0.05, 1e-5, 0.99))
    assert parity.passed, parity


def test_llama_cpp_gpu_row_runs_its_path_on_a_cpu_build(tiny_ggufs, monkeypatch):
    """The all-layers-offloaded row's code path, with CUDA faked present: a CPU-only build runs the 999 layers on
    the CPU, so the row is measured and reported (without nvidia-smi, no peak memory)."""
    from komt_edge.bench import gpu

    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu, "gpu_offload_supported", lambda: True)
    monkeypatch.setattr(gpu.shutil, "which", lambda _name: None)
    (row,) = gpu._llama_cpp_rows([tiny_ggufs["q8_0"]], n_prompt=32, n_gen=8, repetitions=1)
    assert row.status == "ok" and row.pp_ts > 0 and row.tg_ts > 0 and row.peak_gpu_bytes is None
