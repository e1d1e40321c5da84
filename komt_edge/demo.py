"""`komt-edge demo`: the whole spine on an embedded default, offline, in about a minute on 2 cores.

It builds a tiny komt-mistral-shaped model (random weights, the real Mistral v0.1 SentencePiece tokenizer from
mistral-common) and a komt-recipe LoRA adapter trained for a few seconds to answer Korean prompts, then runs
merge → gguf (q4_0, q8_0) → verify, and answers one Korean prompt through llama.cpp with the komt template
taken from the GGUF file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .chat import ChatSession, Sampling
from .errors import KomtError
from .gguf import convert
from .merge import merge
from .runtime import load
from .tiny import DEMO_QA, build_tiny_adapter, build_tiny_model
from .verify import VerifyReport, VerifyRun, verify_files

DEMO_NAME = "komt-tiny-mistral"


@dataclass
class DemoResult:
    merged: Path
    files: list[Path]
    verification: VerifyRun
    prompt: str
    answers: dict[str, str]  # file name → llama.cpp's chat answer

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def reports(self) -> list[VerifyReport]:
        return self.verification.reports

    def summary(self) -> str:
        lines = ["llama-cpp-python chat, formatted by the komt template stored in each file:", f"  user: {self.prompt}"]
        lines += [f"  {name}: {answer}" for name, answer in self.answers.items()]
        if self.files:  # nothing is started: the commands to talk to the best file yourself
            best = next((f for f in self.files if "Q8_0" in f.name), self.files[-1])
            lines += ["", "Chat with it yourself (in the terminal, or an OpenAI-compatible server with a chat page):",
                      f"  komt-edge chat {best}", f"  komt-edge serve {best}    # then open http://127.0.0.1:8000/"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"merged": str(self.merged), "files": [str(f) for f in self.files], "passed": self.passed,
                "verification": self.verification.to_dict(), "prompt": self.prompt, "answers": self.answers}

    def check(self) -> None:
        if not self.passed:
            raise KomtError("the demo's verification failed: see the reports above")


def ask(gguf_file: Path, prompt: str, *, n_threads: int | None = None, max_tokens: int = 48) -> str:
    """One chat turn as `komt-edge chat` runs it: llama-cpp-python, formatted by the GGUF's own chat template."""
    model = load(gguf_file, n_ctx=512, n_threads=n_threads, seed=0)
    try:
        session = ChatSession(model, sampling=Sampling(temperature=0.0, top_k=1, max_tokens=max_tokens, seed=0))
        return "".join(session.reply(prompt))
    finally:
        model.close()


def demo(out: str | Path = "dist/demo", *, quants: tuple[str, ...] = ("q4_0", "q8_0"),
             n_threads: int | None = None, progress: bool = True, log=print) -> DemoResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, adapter, merged = out / f"{DEMO_NAME}-base", out / f"{DEMO_NAME}-lora", out / DEMO_NAME
    log(f"[1/5] building the tiny base model and its komt tokenizer → {base}")
    build_tiny_model(base, "mistral")
    log(f"[2/5] training a komt-recipe LoRA adapter (r=8, alpha=32) on Korean Q&A → {adapter}")
    build_tiny_adapter(base, adapter, "mistral")
    log(f"[3/5] merge → {merged}")
    merge(base, adapter, merged)
    log(f"[4/5] gguf {' '.join(quants)} → {out}")
    files = convert(merged, quants, out, template="mistral", name=DEMO_NAME, n_threads=n_threads, progress=progress)
    log("[5/5] verify against the merged HF model")
    verification = verify_files(files, str(merged), template="mistral", n_threads=n_threads, log=log,
                                progress=progress)
    prompt = DEMO_QA[0][0]
    answers = {f.name: ask(f, prompt, n_threads=n_threads) for f in files}
    return DemoResult(merged, files, verification, prompt, answers)
