"""Why the scalar baselines move between the two testbeds: each expert matrix quantized alone, on FP inputs.

    python -m quantize_tools.eval.matrix_errors   # writes docs/results/matrix_errors.json, rendered by quantize_tools.eval.results

On the results page (``docs/results.md``, "What differs between the testbeds") RTN and GPTQ
g128 sit much closer to plain VQ on the sparse testbed than on the all-experts one, while the
VQ methods keep their distance. The cells' own per-matrix errors cannot say why: each is
measured on inputs that already went through that cell's quantized earlier layers. Here every
matrix of a few layers is quantized from the FP weights, GPTQ's Hessian taken from the FP
model's calibration inputs (the results cells' corpus, windows and seed), and scored on the FP
model's inputs for held-out text (the evaluation's Wikipedia passages), so that GPTQ gets no
credit for fitting the tokens it is scored on. A matrix's inputs are the tokens routed to its
expert (all tokens for the shared expert and on the all-experts testbed) for ``gate``/``up``,
and their FP intermediate activations for ``down``. Reported per testbed, group and matrix
type: the relative output error ``|X (Q - W)^T|^2 / |X W^T|^2`` of RTN g128, GPTQ g128 and
plain VQ (k-means codebook per matrix, as the plain-VQ cells), the relative weight error, and
how concentrated each expert's calibration second moment is (share of its trace in the top
1/32 of its eigen-directions), which is what GPTQ's error feedback exploits. The testbeds are
the ones ``python -m quantize_tools.eval.results`` builds (``--all-experts``, ``--sparse``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm


def capture(model_dir: Path, token_sets: list[torch.Tensor], layers: list[int], batch: int):
    """FP inputs of the chosen layers' experts, per token set: ``[{layer: (x [T, hidden], topk [T, k])}]``."""
    from transformers import AutoModelForCausalLM

    from vllm_kbvq.archs import arch_for_config

    from ..calibration.layerwise import record_inputs
    from ..pipeline import EXPERTS_INPUTS

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = arch_for_config(model.config)
    captured = []
    for tokens in token_sets:
        with contextlib.ExitStack() as stack, torch.no_grad():
            seen = {i: stack.enter_context(record_inputs(
                getattr(getattr(model.model.layers[i], arch.moe_attr), arch.experts_attr), EXPERTS_INPUTS))
                for i in layers}
            for b in range(0, tokens.shape[0], batch):
                model(tokens[b:b + batch], use_cache=False)
        captured.append({i: (torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a in v]),
                             torch.cat([a[1].reshape(a[0].shape[0], -1) for a in v])) for i, v in seen.items()})
    return model.config, arch, captured


def concentration(h: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(h.double()).flip(0).clamp_min(0)
    return float(ev[: max(1, h.shape[0] // 32)].sum() / ev.sum())


def matrix_errors(w: torch.Tensor, x: torch.Tensor, x_test: torch.Tensor, bits: int, vector_dim: int, group: int,
                  damp: float, seed: int) -> dict[str, float]:
    from vllm_kbvq.kernels.torch_moe import dequantize_rows

    from ..method.gptq import gptq_quantize, rtn_quantize, second_moment
    from ..method.vq import vq_quantize

    h = second_moment(x.split(8192), x.shape[1], "cpu")
    codes, codebook = vq_quantize(w[None], bits, vector_dim, seed=seed)
    quantized = {"rtn": rtn_quantize(w, bits, group), "gptq": gptq_quantize(w, h, bits, group, damp),
                 "plain_vq": dequantize_rows(codes, codebook[:, None])[0]}
    y = x_test @ w.T
    energy = float((y**2).sum())
    out = {f"{m}_output": float(((x_test @ q.T - y) ** 2).sum()) / energy for m, q in quantized.items()}
    out |= {f"{m}_weight": float(((q - w) ** 2).sum() / (w**2).sum()) for m, q in quantized.items()}
    out["input_top_1_32_share"] = concentration(h)
    out["tokens"], out["test_tokens"] = int(x.shape[0]), int(x_test.shape[0])
    return out


def testbed_errors(label: str, model_dir: Path, tokens, test_tokens, layers, args) -> dict:
    from transformers.activations import ACT2FN

    from vllm_kbvq.archs import MoEGeometry

    from ..method.group import group_seed
    from ..options import LayerOptions
    from ..shards import ShardReader

    config, arch, (inputs, test_inputs) = capture(model_dir, [tokens, test_tokens], layers, args.batch)
    act = ACT2FN[config.hidden_act]
    reader = ShardReader(model_dir)
    geom = MoEGeometry.from_config(config)
    n_experts = geom.n_experts
    rows = []
    for i in tqdm(layers, desc=f"{label}: layers", unit="layer"):
        (x, topk), (xt, topk_t) = inputs[i], test_inputs[i]
        members = [("experts", e, (topk == e).any(-1), (topk_t == e).any(-1)) for e in range(n_experts)]
        if geom.shared_inter:
            members.append(("shared_experts", 0, None, None))
        for group, e, routed, routed_t in members:
            w = {wt: reader.get(arch.expert_tensor(i, e, wt) if group == "experts" else arch.shared_tensor(i, wt),
                                torch.float32) for wt in ("gate", "up", "down")}
            xe, xte = (x, xt) if routed is None else (x[routed], xt[routed_t])
            if not (xe.shape[0] and xte.shape[0]):
                continue
            hid, hid_t = (act(a @ w["gate"].T) * (a @ w["up"].T) for a in (xe, xte))
            for wt, inp, inp_t in (("gate", xe, xte), ("up", xe, xte), ("down", hid, hid_t)):
                err = matrix_errors(w[wt], inp, inp_t, args.bits, args.vector_dim, args.group_size, LayerOptions.damp,
                                    group_seed(LayerOptions.seed, i, group, wt))
                rows.append({"layer": i, "group": group, "member": e, "matrix": wt, **err})
    return {"model": str(model_dir), "experts": n_experts, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Means over layers and members, per group and matrix type."""
    out: dict = {}
    for key in sorted({(r["group"], r["matrix"]) for r in rows}):
        sel = [r for r in rows if (r["group"], r["matrix"]) == key]
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in sel[0] if k not in ("layer", "group", "member", "matrix")}
        mean["gptq_over_rtn_output"] = mean["gptq_output"] / mean["rtn_output"]
        mean["plain_vq_over_rtn_output"] = mean["plain_vq_output"] / mean["rtn_output"]
        mean["plain_vq_over_rtn_weight"] = mean["plain_vq_weight"] / mean["rtn_weight"]
        mean["matrices"] = len(sel)
        out[f"{key[0]}.{key[1]}"] = mean
    return out


def main(argv=None) -> int:
    from ..options import LayerOptions
    from ..pipeline import QuantizeOptions
    from .protocol import CALIB_SAMPLES, CALIB_SEQLEN

    p = argparse.ArgumentParser(prog="python -m quantize_tools.eval.matrix_errors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all-experts", type=Path, default=Path("out/results/testbed"))
    p.add_argument("--sparse", type=Path, default=Path("out/results/sparse/testbed"))
    p.add_argument("--layers", default="0,6,12,18,24,29", help="comma-separated decoder layers")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--vector-dim", type=int, default=2, help="plain VQ's vector length (the 3-bit cells' 2)")
    p.add_argument("--group-size", type=int, default=QuantizeOptions.group_size)
    p.add_argument("--nsamples", type=int, default=CALIB_SAMPLES, help="calibration windows (the results cells')")
    p.add_argument("--seqlen", type=int, default=CALIB_SEQLEN)
    p.add_argument("--test-windows", type=int, default=16, help="held-out windows of --seqlen tokens to score on")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path("docs/results/matrix_errors.json"),
                   help="JSON record, rendered into docs/results.md by python -m quantize_tools.eval.results "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    from ..shards import CheckpointError, ShardReader

    try:
        layers = [int(v) for v in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers: expected comma-separated layer numbers like 0,6,12, got {args.layers!r}")
    for flag, model_dir in (("--all-experts", args.all_experts), ("--sparse", args.sparse)):
        try:
            ShardReader(model_dir)
        except CheckpointError as e:
            p.error(f"{flag}: {e} (python -m quantize_tools.eval.results builds both testbeds)")
        n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        if not all(0 <= i < n_layers for i in layers):
            p.error(f"--layers: {model_dir} has layers 0-{n_layers - 1}, got {args.layers}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from ..calibration.corpus import CALIBRATION_CORPUS, HELDOUT_CORPUS, calibration_texts, heldout_texts
    from ..calibration.tokens import calibration_tokens, token_windows
    from ..run_folder import write_json_atomic

    t0 = time.time()
    result = {"bits": args.bits, "vector_dim": args.vector_dim, "group_size": args.group_size,
              "damp": LayerOptions.damp, "layers": layers, "calibration": CALIBRATION_CORPUS,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "test_text": HELDOUT_CORPUS,
              "test_windows": args.test_windows, "testbeds": {}}
    for label, model_dir in (("all-experts", args.all_experts), ("sparse", args.sparse)):
        tok = AutoTokenizer.from_pretrained(model_dir)
        tokens = calibration_tokens(tok, calibration_texts(), args.nsamples, args.seqlen, LayerOptions.seed)
        test = token_windows(tok, heldout_texts(), args.seqlen)[: args.test_windows]
        result["testbeds"][label] = testbed_errors(label, model_dir, tokens, test, layers, args)
    result["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(args.output, result)
    print("\n".join(table(result)))
    print(f"wrote {args.output}")
    return 0


_COLUMNS = (("rtn_output", "RTN g128", 4), ("gptq_output", "GPTQ g128", 4), ("plain_vq_output", "plain VQ", 4),
            ("gptq_over_rtn_output", "GPTQ ÷ RTN", 2), ("plain_vq_over_rtn_output", "plain VQ ÷ RTN", 2),
            ("plain_vq_over_rtn_weight", "plain VQ ÷ RTN, weights", 2),
            ("input_top_1_32_share", "input top-1/32 share", 2))


def table(rec: dict) -> list[str]:
    """Markdown for the results page: one row per testbed, group and matrix type, and the routed gate/up contrast."""
    lines = [f"Each expert matrix of layers {', '.join(map(str, rec['layers']))} quantized alone at {rec['bits']} bits "
             f"from the FP weights (plain VQ: {1 << rec['bits'] * rec['vector_dim']} x {rec['vector_dim']} k-means "
             f"codebook per matrix; GPTQ's Hessian from the cells' calibration windows) and scored on the FP model's "
             f"inputs for {rec['test_windows']} windows of held-out text: mean relative output error "
             "|X(Q − W)ᵀ|² / |XWᵀ|², the ratios of those means, plain VQ's weight error over RTN's, and the share "
             "of the input second moment's trace in its top 1/32 eigen-directions (`python -m "
             "quantize_tools.eval.matrix_errors`).", "",
             "| testbed | matrices | " + " | ".join(c[1] for c in _COLUMNS) + " |", "|" + "---|" * (2 + len(_COLUMNS))]
    for label, tb in rec["testbeds"].items():
        for key, m in tb["summary"].items():
            lines.append(f"| {label} | {key} ({m['matrices']}) | "
                         + " | ".join(f"{m[c]:.{n}f}" for c, _, n in _COLUMNS) + " |")
    both = [rec["testbeds"][t]["summary"] for t in ("all-experts", "sparse") if t in rec["testbeds"]]
    if len(both) == 2:
        def mean(s, col):
            return (s["experts.gate"][col] + s["experts.up"][col]) / 2
        a, b = both
        lines += ["", "Routed experts' gate and up (mean of the two), all-experts → sparse: GPTQ ÷ RTN "
                  f"{mean(a, 'gptq_over_rtn_output'):.2f} → {mean(b, 'gptq_over_rtn_output'):.2f}, plain VQ ÷ RTN "
                  f"{mean(a, 'plain_vq_over_rtn_output'):.2f} → {mean(b, 'plain_vq_over_rtn_output'):.2f}, input "
                  f"top-1/32 share {mean(a, 'input_top_1_32_share'):.2f} → {mean(b, 'input_top_1_32_share'):.2f}."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
