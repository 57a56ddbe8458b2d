"""Offline KBVQ-MoE quantizer: calibration, IDRE (:mod:`.idre`), VQ (:mod:`.vq`), BCOS (:mod:`.bcos`),
one MoE block (:mod:`.moe_layer`), layer streaming and checkpoint writing (:mod:`.pipeline`), the
scalar baselines (:mod:`.baselines`) and ``kbvq-quantize`` (:mod:`.cli`).

Evaluation lives in :mod:`.eval` and the testbeds and demo in :mod:`.testbed`; the quantizer
imports neither.
"""
