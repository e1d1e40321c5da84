"""Importance matrices, one concern in one package: the statistics and llama.cpp's file format, the Korean
calibration text, and the Korean imatrix of a conversion computed once per model and text (:mod:`.core`); the
``komt-edge imatrix`` command (:mod:`.command`, imported by the CLI on its own: it uses the conversion, which uses
the core). Which quantization plans use an imatrix is the planner's rule (``komt_edge.converters.plan``)."""

from .core import (DEFAULT_N_CTX, KOREAN, MIN_BATCH_ROWS, Imatrix, compute, imatrix_name, korean_calibration_text,
                   model_fingerprint, resolve_imatrix)

__all__ = ["DEFAULT_N_CTX", "KOREAN", "MIN_BATCH_ROWS", "Imatrix", "compute", "imatrix_name",
           "korean_calibration_text", "model_fingerprint", "resolve_imatrix"]
