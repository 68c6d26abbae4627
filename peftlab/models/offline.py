"""Real pretrained models and tokenizers that arrive through the package registries.

Filled in by the offline-assets work (issue 7); registering here makes
``model.name`` / ``data.tokenizer`` resolve them without network access.
"""
