"""Block fine-tuning and the row scale before k-means, measured against the FP model (transformers)."""
import signal

import pytest
import torch

from interrupted import calib_file, checkpoint_digest, six_layer_model, stop_after_layers
from quantize_tools.cli import main as cli_main
from quantize_tools.method.group import quantize_group
from quantize_tools.options import LayerOptions
from quantize_tools.pipeline import QuantizeOptions, quantize
from tiny_models import ARCH_NAMES, MIXED
from vllm_kbvq.archs import arch_for_config
from vllm_kbvq.format import validate_checkpoint
from vllm_kbvq.reference import load_kbvq_model, moe_blocks


def _tokens(n, seqlen=64, seed=0):
    return torch.randint(1, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def block_errors(model_dir, qdir, ids) -> list[float]:
    """Per MoE layer, ``|Q(x) - FP(x)|^2 / |FP(x)|^2`` for the quantized block Q and the FP block of the
    original model, both on the inputs the quantized model's own earlier layers give that block."""
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    q = load_kbvq_model(qdir)  # the torch oracle
    arch = arch_for_config(fp.config)
    seen = {}
    hooks = [block.register_forward_hook(lambda m, args, out, i=i: seen.setdefault(i, []).append((args[0], out)))
             for i, block in moe_blocks(q, arch)]
    with torch.no_grad():
        q(ids)
        for h in hooks:
            h.remove()
        errs = []
        for i, block in moe_blocks(fp, arch):
            (x, y), = seen[i]
            y_fp = block(x)
            errs.append(float((y - y_fp).pow(2).sum() / y_fp.pow(2).sum()))
    return errs


def _assert_lower(untuned: dict, tuned: dict) -> None:
    """Every MoE layer's block error (of :func:`block_errors`, per token set) lower after tuning."""
    for tokens in ("calibration", "held out"):
        for layer, (before, after) in enumerate(zip(untuned[tokens], tuned[tokens])):
            assert after < before, f"{tokens} tokens, MoE layer {layer}: {before:.4f} -> {after:.4f}"


_BASE = dict(bits=2, kmeans_iters=10, rank_ratio=1 / 16, compare_plain_vq=False)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_finetuning_lowers_block_error_on_calibration_and_held_out_tokens(arch, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    calib, held = _tokens(16), _tokens(4, seed=1234)
    errs = {}
    for steps in (0, 40):
        out = tmp_path / f"ft{steps}"
        report = quantize(model_dir, out, calib, QuantizeOptions(**_BASE, finetune_steps=steps, finetune_batch=256),
                          progress=False)
        assert validate_checkpoint(out).finetune_steps == steps
        errs[steps] = {"calibration": block_errors(model_dir, out, calib), "held out": block_errors(model_dir, out, held)}
        if steps:
            for layer in report["layers"]:
                ft = layer["finetune"]
                assert ft["kept"] and ft["rel_err_after"]["fit"] < ft["rel_err_before"]["fit"]
                assert ft["seconds"] > 0
    _assert_lower(errs[0], errs[40])


def test_finetuning_a_mixed_checkpoint_keeps_its_widths_and_lowers_block_error(tiny_model, tmp_path):
    """``--bits-budget`` with ``--finetune-steps``: the widths are allocated before the block is tuned (the
    first MoE layer, whose inputs tuning cannot change, gets the widths of the untuned run), the tuned
    tensors keep the shapes of their widths, and tuning lowers every layer's block error as at one width."""
    model_dir = tiny_model("qwen2_moe")
    calib, held = _tokens(16), _tokens(4, seed=1234)
    errs, cfgs = {}, {}
    for steps in (0, 40):
        out = tmp_path / f"ft{steps}"
        quantize(model_dir, out, calib, QuantizeOptions(**_BASE, **MIXED, finetune_steps=steps, finetune_batch=256),
                 progress=False)
        cfgs[steps] = validate_checkpoint(out)  # every tensor the shape its matrix's width gives
        errs[steps] = {"calibration": block_errors(model_dir, out, calib), "held out": block_errors(model_dir, out, held)}
    first = str(min(cfgs[0].layers))
    assert cfgs[40].format_version == 2 and cfgs[40].width_of[first] == cfgs[0].width_of[first]
    assert any(len(set(w["experts"]["down"] + w["experts"]["gate"])) > 1 for w in cfgs[40].width_of.values())
    _assert_lower(errs[0], errs[40])


def test_finetuned_run_is_deterministic_and_resumes_identically(tmp_path):
    model_dir = six_layer_model(tmp_path / "m")
    calib = calib_file(tmp_path, repeats=40)

    def args(out):
        return ["--model", str(model_dir), "--output", str(tmp_path / out), "--calib", str(calib), "--nsamples", "8",
                "--seqlen", "64", "--kmeans-iters", "20", "--no-plain-vq-report", "--quiet", "--row-scale",
                "--finetune-steps", "10", "--finetune-batch", "128"]

    done = stop_after_layers(args("killed"), tmp_path / "killed", 2, signal.SIGKILL)
    assert 2 <= len(done) < 6
    assert cli_main(args("killed") + ["--resume"]) == 0
    assert cli_main(args("a")) == 0
    assert cli_main(args("b")) == 0
    digests = [checkpoint_digest(tmp_path / out) for out in ("a", "b", "killed")]
    assert digests[0] == digests[1] == digests[2]


def _uneven_rows(n=3, oc=96, ic=128, seed=0):
    """Matrices whose rows differ in scale by up to 30x, as real expert matrices' rows do, less extremely."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(n, oc, 1).uniform_(-1.7, 1.7, generator=g))
    return torch.randn(n, oc, ic, generator=g) * scale, torch.randn(2048, ic, generator=g)


@pytest.mark.parametrize("rank_ratio", [0.0, 1 / 16])
def test_row_scale_is_folded_exactly_and_lowers_output_error(rank_ratio):
    """The stored tensors (row scale folded into affine_s and lr_a) compute what the quantizer measured,
    and on rows of uneven scale the scaled codebook fits better."""
    w, x = _uneven_rows()
    n, oc, ic = w.shape
    y = x @ w.transpose(1, 2)
    errs = {}
    for row_scale in (False, True):
        opts = LayerOptions(bits=2, vector_dim=2, kmeans_iters=20, rank_ratio=rank_ratio, idre=rank_ratio > 0,
                            compare_plain_vq=False, row_scale=row_scale)
        rank = round(ic * rank_ratio)
        cov = x.T @ x / x.shape[0]
        res = quantize_group(w, cov, lambda e: x, opts, rank, seed=3)
        out = torch.stack([res.linear(e)(x) for e in range(n)])
        err = float((out - y).pow(2).sum() / y.pow(2).sum())
        assert err == pytest.approx(res.report["rel_err"]["idre_vq_bcos"], rel=2e-3)  # fp16 rounding of the fold
        errs[row_scale] = err
    assert errs[True] < 0.8 * errs[False], errs
