"""BA-LoRA: budget-aware LoRA ranks from gradient importance (method.py), and its pure allocation math (alloc.py).

Import the modules themselves; this file imports nothing, so that a layer module can be
imported without its method (DoRA uses ``sora.layers``)."""
