"""Training benchmark: `komt-edge train` against plain peft + transformers Trainer, same data, same settings.

    python -m komt_edge.benchmarks.train_bench --shape mistral-7b --bits 4 --bits 16 --steps 20 --seq 512
    python -m komt_edge.benchmarks.train_bench --shape tiny --device cpu --steps 6 --seq 128   # CPU smoke run

For each shape a random bf16 checkpoint (Mistral layout, the real Mistral v0.1 tokenizer; see convert_bench) is
written locally, and a JSONL file of Korean instruction records (the tests' records, answers repeated to about
``--seq`` tokens). Then, for every ``--bits``, two runs in fresh processes:

- komt-edge: ``komt_edge.train.train`` (komt's recipe: nf4 + double quant + bf16 compute at 4 bits, LoRA r=8 /
  alpha=32 / dropout 0.05 on q,k,v,o,gate,up,down, gradient checkpointing, paged AdamW);
- baseline: the same model, quantization, LoRA config and TrainingArguments written directly against peft and
  transformers (AutoTokenizer, the prompt masked by its token count, DataCollatorForSeq2Seq, Trainer).

Each reports tokens/s (non-padding tokens through the model / time in ``Trainer.train``) and peak memory: GPU
(``torch.cuda.max_memory_allocated``) on CUDA, peak RSS on CPU. ``--json`` writes the results. On CUDA it needs
``pip install 'komt-edge[gpu]'`` (bitsandbytes); the 7B checkpoint takes about 15 GB of disk in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "data" / "ko_instruct.jsonl"
LORA = dict(r=8, alpha=32, dropout=0.05,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def write_data(path: Path, n: int, seq: int, tokenizer_dir: Path) -> int:
    """n Korean instruction records whose prompt + answer is about ``seq`` tokens; returns the mean length."""
    import sentencepiece as spm

    from komt_edge.templates import MISTRAL
    from komt_edge.tiny import DEMO_QA

    if RECORDS.is_file():
        base = [json.loads(line) for line in RECORDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        base = [{"instruction": q, "output": a} for q, a in DEMO_QA]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = dict(base[i % len(base)])
            prompt = MISTRAL.format(rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else ""))
            answer, piece = rec["output"], " " + rec["output"]
            while len(sp.encode(prompt + answer + piece)) + 2 <= seq:
                answer += piece
            rec["output"] = answer
            lengths.append(len(sp.encode(prompt + answer)) + 2)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return sum(lengths) // len(lengths)


# -- workers (one run per process, so that peak memory is the run's own) ------------------------------------

def _peaks(cuda: bool) -> dict:
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}
    if cuda:
        import torch

        peaks["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 1024 ** 3
        peaks["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 1024 ** 3
    return peaks


def worker_komt(a) -> dict:
    from komt_edge.train import train

    result = train(a.model, a.data, a.out, bits=a.bits, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                   lora_dropout=LORA["dropout"], target_modules=LORA["targets"], max_steps=a.steps, lr=a.lr,
                   batch_size=a.batch, grad_accum=a.grad_accum, max_length=a.seq, eval_split=0.0, warmup_steps=2,
                   save_steps=10 ** 9, device=a.device, progress=False, log=lambda *_: None)
    return {"tokens": result.tokens_seen, "train_s": result.runtime_s, "tokens_per_s": result.tokens_per_s,
            "steps": result.steps, "first_loss": result.first_loss, "last_loss": result.last_loss,
            "mode": result.mode}


def worker_peft(a) -> dict:
    """The baseline: what one writes with peft and transformers directly, with the same settings."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, LlamaTokenizer, Trainer,
                              TrainingArguments)

    from komt_edge.templates import MISTRAL

    cuda = a.device == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
    tok = LlamaTokenizer.from_pretrained(a.model)  # the checkpoint's tokenizer_class (AutoTokenizer would try
    # mistral-common's format for a Mistral model, which needs tiktoken)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padded positions carry attention_mask 0 and label -100
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = []
    for r in rows:
        prompt = MISTRAL.format(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))
        ids = tok(prompt + r["output"] + tok.eos_token, add_special_tokens=True)["input_ids"][: a.seq]
        n_prompt = len(tok(prompt, add_special_tokens=True)["input_ids"])
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [-100] * n_prompt + ids[n_prompt:]})
    kwargs = {"dtype": compute}
    if cuda:
        kwargs["device_map"] = {"": 0}
        if a.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute)
        elif a.bits == 8:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    model.config.use_cache = False
    if cuda and a.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cuda:
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=a.out, max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=2,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.grad_accum,
        optim="paged_adamw_32bit" if cuda else "adamw_torch", gradient_checkpointing=cuda,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cuda else None, bf16=bf16,
        fp16=cuda and not bf16, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, seed=42, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8 if cuda else None,
                                                           label_pad_token_id=-100))
    start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s, "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run_worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for name in ("impl", "model", "data", "out", "device"):
        ap.add_argument(f"--{name}", required=True)
    for name in ("bits", "steps", "seq", "batch", "grad_accum"):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = (worker_komt if a.impl == "komt" else worker_peft)(a)
    result.update(_peaks(cuda))
    print("RESULT " + json.dumps(result))


# -- driver ----------------------------------------------------------------------------------------------

def run_one(impl: str, model: Path, data: Path, work: Path, bits: int, a) -> dict:
    out = work / f"{impl}-{bits}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "komt_edge.benchmarks.train_bench", "--worker", "--impl", impl, "--model", str(model),
           "--data", str(data), "--out", str(out), "--device", a.device, "--bits", str(bits), "--steps", str(a.steps),
           "--seq", str(a.seq), "--batch", str(a.batch), "--grad-accum", str(a.grad_accum), "--lr", str(a.lr)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "bits": bits, "error": proc.stderr[-1500:]}
    return {"impl": impl, "bits": bits, "wall_s": wall, **json.loads(lines[-1][len("RESULT "):])}


def table(rows: list[dict], device: str) -> str:
    mem_key = "peak_gpu_allocated_gib" if device == "cuda" else "peak_rss_gib"
    mem_name = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    out = [f"| shape | bits | implementation | tokens/s | {mem_name} | steps | loss first → last | wall s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        impl = "komt-edge train" if r["impl"] == "komt" else "peft + Trainer"
        if "error" in r:
            out.append(f"| {r['shape']} | {r['bits']} | {impl} | failed: {r['error'].splitlines()[-1][:80]} | | | | |")
            continue
        loss = (f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None else "-")
        out.append(f"| {r['shape']} | {r['bits']} | {impl} | {r['tokens_per_s']:.1f} | {r[mem_key]:.2f} | "
                   f"{r['steps']} | {loss} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return run_worker(argv[1:])
    from .convert_bench import SHAPES, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable (default: mistral-7b "
                    "on CUDA, tiny on CPU)")
    ap.add_argument("--bits", action="append", type=int, choices=[4, 8, 16, 32],
                    help="repeatable (default: 4 and 16 on CUDA; CPU trains in 32)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=512, help="tokens per record")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    import torch

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    bits_list = a.bits or ([4, 16] if a.device == "cuda" else [32])
    if a.device == "cpu" and any(b != 32 for b in bits_list):
        sys.exit("error: on CPU only --bits 32 runs (4/8/16-bit training needs CUDA)")
    shapes = a.shape or (["mistral-7b"] if a.device == "cuda" else ["tiny"])
    work = a.work or Path(tempfile.mkdtemp(prefix="komt-train-bench-"))
    rows = []
    try:
        for shape in shapes:
            model = work / f"{shape}-hf"
            if not (model / "config.json").is_file():
                write_checkpoint(model, SHAPES[shape])
            data = work / f"{shape}-data.jsonl"
            mean_len = write_data(data, a.steps * a.batch * a.grad_accum, a.seq, model)
            print(f"{shape}: records of ~{mean_len} tokens, {a.steps} steps × {a.batch} × {a.grad_accum}", flush=True)
            for bits in bits_list:
                for impl in ("komt", "peft"):
                    row = {"shape": shape, **run_one(impl, model, data, work, bits, a)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        if not a.keep and a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    env = {"command": " ".join(["python -m komt_edge.benchmarks.train_bench", *argv]),
           "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
           "device": a.device,
           "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "steps": a.steps, "seq": a.seq, "batch": a.batch, "grad_accum": a.grad_accum}
    print()
    print(table(rows, a.device))
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
