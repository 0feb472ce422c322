"""LoRA experts, together: the PEFT adapter format (`adapter`), LoRA experts mapped onto the upcycled modules
(`upcycle`) and a preference exported as one adapter (`export`).

The math of the factored modules they run in is `pwemoe.core.factored` (pure torch): each adapted layer
computes W_0 x + sum_i lambda_i(r) s_i B_i (A_i x), never densified. This package's own import is the
adapter format only (the lowest layer); `pwemoe.lora.upcycle` and `pwemoe.lora.export` are imported by path.
"""

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    LoraLayer,
    is_lora_adapter,
    read_lora_adapter,
    write_lora_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraAdapter",
    "LoraLayer",
    "is_lora_adapter",
    "read_lora_adapter",
    "write_lora_adapter",
]
