"""KBVQ compute: the torch implementation (:mod:`.torch_moe`, the oracle), the Triton kernels
(:mod:`.triton_moe`) and the custom ops that choose between them (:mod:`.dispatch`).

Importing this package registers nothing; importing :mod:`.dispatch` registers ``torch.ops.kbvq``.
"""
