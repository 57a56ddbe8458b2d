"""vllm-kbvq: KBVQ-MoE quantized Mixture-of-Experts models for vLLM.

The runtime side: the checkpoint format (:mod:`.format`), bit packing (:mod:`.packing`),
per-architecture data (:mod:`.archs`), the pure-torch reference runtime as transformers
modules (:mod:`.reference`), the compute (:mod:`.kernels`: the torch implementation, the
Triton kernels and the dispatch between them), the vLLM plugin (:mod:`.plugin`: entry point,
quantization config, methods, runtime layout, and the reference model on the native CPU
kernels) and ``kbvq-serve`` (:mod:`.serve`).
Nothing here imports the quantizer (``quantize_tools``).
"""
__version__ = "0.1.0"
