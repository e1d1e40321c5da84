"""A quantization plan with per-tensor types, komt-edge against the llama-quantize tool itself.

    make llama-tools
    python -m komt_edge.benchmarks.plan_llama_quantize

tests/test_plan.py checks a plan's files against llama_model_quantize called through llama-cpp-python (what
`make test` has); this runs the llama-quantize binary `make llama-tools` builds from the pinned sdist, with the
command line the plan gives (``QuantPlan.llama_quantize_args``: ``--tensor-type PATTERN=TYPE`` per override, and
``--imatrix FILE``), on komt-edge's own bf16 conversion of the tiny Mistral, and compares every tensor and key
(provenance aside) with the file ``komt-edge gguf`` writes for the same plan: komt-edge's own writer without an
imatrix, llama_model_quantize with one. Writes benchmarks/results/plan-llama-quantize.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = ROOT / ".cache" / "llama-tools" / "build" / "bin" / "llama-quantize"
RESULT = ROOT / "benchmarks" / "results" / "plan-llama-quantize.json"
TENSOR_TYPES = "blk\\.0\\.attn_q\\.weight=q8_0 attn_v=q6_K ffn_up=q5_K output\\.weight=q8_0"


def main() -> None:
    import numpy as np
    import torch
    from gguf import GGUFReader

    from komt_edge.converters.gguf_file import PROVENANCE_KEYS, gguf_differences
    from komt_edge.converters.plan import QuantPlan, parse_tensor_types
    from komt_edge.gguf import convert
    from komt_edge.imatrix import Imatrix
    from komt_edge.tiny import build_tiny_model

    if not LLAMA_QUANTIZE.is_file():
        sys.exit(f"{LLAMA_QUANTIZE} is missing: run `make llama-tools`")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "mistral", "mistral", dtype=torch.bfloat16)
        source = convert(str(model), ["bf16"], work / "bf16", name="tiny", n_threads=2, progress=False)[0]
        rng = np.random.default_rng(0)
        columns = {t.name: int(t.shape[0]) for t in GGUFReader(source).tensors
                   if t.name.startswith("blk.") and len(t.shape) == 2}
        imatrix = Imatrix({n: (rng.uniform(0.5, 2.0, (1, c)).astype(np.float32), np.array([64], np.float32))
                           for n, c in columns.items()}, datasets=["synthetic"], chunk_count=1,
                          chunk_size=64).write(work / "tiny.imatrix.gguf")
        plan = QuantPlan("Q4_K_M_TT", "q4_k_m", parse_tensor_types(TENSOR_TYPES), made_by="a hand-made mix")
        for matrix in (None, imatrix):
            folder = work / ("imatrix" if matrix else "plain")
            ours = convert(str(model), [plan], folder, name="tiny", n_threads=2, progress=False, imatrix=matrix)[0]
            theirs = folder / "llama-quantize.gguf"
            command = plan.uses(str(matrix) if matrix else None).llama_quantize_args(str(source), str(theirs))
            proc = subprocess.run([str(LLAMA_QUANTIZE), *command[1:], "2"], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"llama-quantize failed: {proc.stderr[-2000:]}")
            differences = gguf_differences(ours, theirs, ignore=PROVENANCE_KEYS)
            names = [t.name for t in GGUFReader(ours).tensors]
            changed = sum(1 for n in names if any(re.search(p, n) for p, _ in plan.tensor_types))
            rows.append({"plan": plan.name, "imatrix": matrix is not None,
                         "command": " ".join(["llama-quantize", *command[1:]]).replace(str(work), "$WORK"),
                         "tensors": len(names), "tensors_with_a_set_type": changed,
                         "identical": not differences, "differences": differences[:20]})
            print(f"{'imatrix' if matrix else 'no imatrix'}: "
                  f"{'identical' if not differences else differences[:5]}", file=sys.stderr)
    RESULT.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "model": "tiny Mistral (random bf16 weights, "
                                  "2 layers, hidden 256)", "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(RESULT)
    if not all(r["identical"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
