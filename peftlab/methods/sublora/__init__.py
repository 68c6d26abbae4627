"""SubLoRA: LoRA parameters theta0 + P w with only w trained (method.py), and its projectors P (projectors.py).

Import the modules themselves; this file imports nothing, so that a layer module can be
imported without its method (DoRA uses ``sora.layers``)."""
