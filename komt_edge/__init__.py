"""komt-edge: take komt Korean LLMs from a Hub name to verified llama.cpp artifacts."""

__version__ = "0.1.0"
