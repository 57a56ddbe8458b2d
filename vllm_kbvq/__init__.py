"""vllm-kbvq: KBVQ-MoE quantized Mixture-of-Experts models for vLLM.

The runtime side: the checkpoint format (:mod:`.format`), bit packing
(:mod:`.packing`), per-architecture data (:mod:`.archs`), the pure-torch
reference runtime (:mod:`.reference`), and the vLLM plugin: entry point
(:mod:`.plugin`), quantization config and methods (:mod:`.quant_method`), runtime
layout (:mod:`.layout`) and compute ops (:mod:`.ops`), ``kbvq-serve`` (:mod:`.serve`).
"""
__version__ = "0.1.0"
