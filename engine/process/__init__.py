"""The engine process of `lockstep serve` (main), its I/O with the API processes between ticks (hub,
session_table), the wire they speak (wire) and the runtime folder they share (runtime).

Light on purpose: the API processes import wire and runtime from here and never import torch."""
