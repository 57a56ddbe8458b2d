"""The evaluation protocol shared by the results tables, the routing screen and the matrix errors.

One set of numbers, so every figure on the results page is measured the same way.
"""
from __future__ import annotations

__all__ = ["CALIB_SAMPLES", "CALIB_SEQLEN", "PPL_SEQLEN", "PPL_WINDOWS", "ROUTING_RECORD", "MATRIX_ERRORS_RECORD"]

CALIB_SAMPLES, CALIB_SEQLEN = 32, 512  # 16 k tokens of SQuAD Wikipedia paragraphs
PPL_SEQLEN, PPL_WINDOWS = 512, 64  # the perplexity protocol; the routing screen scores the same windows
ROUTING_RECORD = "routing"  # docs/results/sparse/routing.json: the sparse testbed's (E, k) screening
MATRIX_ERRORS_RECORD = "matrix_errors"  # docs/results/matrix_errors.json: both testbeds' matrices on FP inputs
