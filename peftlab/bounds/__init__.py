"""PAC-Bayes compression bounds of trained runs (``peftlab bounds RUN_DIR``).

One module per concern: :mod:`.quantize` (L levels, k-means, straight-through refinement),
:mod:`.coding` (arithmetic coding with constriction), :mod:`.formulas` (message length,
prior, smoothed loss, bounds), :mod:`.scoring` (batched scoring of documents, sequences,
tokens), :mod:`.evaluate` (the pipeline), :mod:`.config` (the ``bounds`` section),
:mod:`.cli`. See docs/bounds.md.
"""
