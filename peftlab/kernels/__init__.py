"""Fused GPU-friendly kernels written with torch ops (floor 5: imports only torch and peftlab.errors).

* :mod:`.lora` -- the fused LoRA / DoRA linear (one autograd node, frozen base, minimal saved tensors);
* :mod:`.cross_entropy` -- the LM head's linear + cross-entropy in chunks of rows (no full logits), and
  ``pad_rows`` (an LM head padded to an aligned size, for training's and the bounds' GEMMs).
"""
