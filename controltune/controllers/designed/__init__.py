"""Control-designed controllers: delta structures produced by a design step of :mod:`controltune.design`.

They sit above ``design/`` (which never imports a controller) and register like every method:
``riccati_feedback`` (finite-horizon Riccati/LQR state feedback), ``costate_lora`` (one MSA step as
LoRA's initial value), ``gramian_lora`` (LoRA placed by controllability scores),
``closed_loop_prefix`` (prefixes as a low-rank function of the sequence's own state) and
``parallel_control`` (Zhang et al., ICML 2025: low-rank state feedback beside a sub-block).
"""

from __future__ import annotations

from . import closed_loop_prefix, costate_lora, gramian_lora, parallel_control, recommended_lora, riccati_feedback

__all__ = ["closed_loop_prefix", "costate_lora", "gramian_lora", "parallel_control", "recommended_lora",
           "riccati_feedback"]
