"""SoRA and SDoRA: gated sparse LoRA/DoRA (method.py), its layers (layers.py, shared with DoRA's factored norm) and the flat gate step (fast.py).

Import the modules themselves; this file imports nothing, so that a layer module can be
imported without its method (DoRA uses ``sora.layers``)."""
