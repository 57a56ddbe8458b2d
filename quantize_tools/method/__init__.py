"""The KBVQ-MoE method (``../shared/PAPER.md``'s sections), one module per step.

Per MoE layer (:mod:`.block`, the per-layer step; the tool in :mod:`quantize_tools.pipeline` streams the
layers and feeds each one the outputs of the quantized layers before it):

- :mod:`.expert_inputs` -- the calibration tokens each routed expert sees, and down's inputs;
- :mod:`.group` -- one group of matrices sharing an input space: :mod:`.idre` (§1, KLT-guided joint SVD:
  the shared basis ``B`` and each expert's ``A_i``), :mod:`.vq` (§2.1, k-means VQ of each residual;
  :mod:`.gptq`'s Hessian-aware assignment as an option), :mod:`.bcos` (§2.2, the channel-wise affine);
- :mod:`.mixed` -- beyond the paper: a width per expert matrix under a bit budget;
- :mod:`.finetune` -- beyond the paper: the layer's continuous tensors tuned once its codes are fixed
  (with the trainable experts of :mod:`.experts`);
- :mod:`.scalar` -- the RTN and GPTQ baselines (§4) on the same matrices and tokens.
"""
