"""Configuration files shipped with komt-edge for multi-GPU training.

- ``deepspeed_zero3_offload.json``: DeepSpeed ZeRO-3, parameters and optimizer state offloaded to CPU memory,
  every batch/precision/optimizer value "auto" so that the Trainer fills it from the train options
  (``komt-edge train --deepspeed zero3`` uses it).
- ``accelerate_multi_gpu.yaml``: ``accelerate launch`` data parallel over the GPUs of one machine.
- ``accelerate_deepspeed_zero3.yaml``: ``accelerate launch`` with the same ZeRO-3 offload settings.

``python -m komt_edge.configs`` prints their paths.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
CONFIGS = {
    "zero3": "deepspeed_zero3_offload.json",
    "multi-gpu": "accelerate_multi_gpu.yaml",
    "accelerate-zero3": "accelerate_deepspeed_zero3.yaml",
}


def config_path(name: str) -> Path:
    """A shipped config by short name (zero3, multi-gpu, accelerate-zero3) or file name."""
    fname = CONFIGS.get(name, name)
    path = CONFIG_DIR / fname
    if not path.is_file() or path.suffix not in (".json", ".yaml"):
        raise KeyError(f"no shipped config {name!r}; known: {', '.join(CONFIGS)}")
    return path
