"""vllm-kbvq: KBVQ-MoE quantized Mixture-of-Experts models for vLLM.

The runtime side: the checkpoint format (:mod:`.format`), bit packing
(:mod:`.packing`), per-architecture data (:mod:`.archs`), the pure-torch
reference runtime (:mod:`.reference`).
"""
__version__ = "0.1.0"
