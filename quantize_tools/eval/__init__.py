"""Evaluation: ``kbvq-eval`` (:mod:`.evaluate`: perplexity, zero-shot tasks with shared-context
scoring), the per-matrix error study (:mod:`.matrix_errors`), the sparse testbed's routing
screen (:mod:`.routing_screen`) and the results page (:mod:`.results`), all on one protocol
(:mod:`.protocol`). The quantizer never imports this package.
"""
