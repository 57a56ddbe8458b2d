"""End-to-end: quantize tiny models of every architecture, load them back, compare with the original."""
import json
import math
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_checkpoints import CASES, broken_copy
from interrupted import calib_file as _calib, checkpoint_digest as _sha, six_layer_model, stop_after_layers
from quantize_tools.cli import main as cli_main
from quantize_tools.pipeline import QuantizeOptions, quantize
from tiny_models import ARCH_NAMES, make_tiny_model, tiny_config
from vllm_kbvq.format import FormatError, validate_checkpoint
from vllm_kbvq.plugin.cpu_model import load_kbvq_model


def _tokens(n=8, seqlen=64, seed=0):
    return torch.randint(1, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel_err(model_dir, qdir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = load_kbvq_model(qdir)
    ids = _tokens(2, 48, seed=99)
    a, b = _logits(ref, ids), _logits(q, ids)
    assert torch.isfinite(b).all()
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_quantize_load_and_compare(arch, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    errs = {}
    # d=2 at every width keeps the codebook smaller than the tiny matrices, so bits are comparable
    for bits in (2, 3, 4):
        out = tmp_path / f"q{bits}"
        report = quantize(model_dir, out, _tokens(), QuantizeOptions(bits=bits, vector_dim=2, kmeans_iters=15),
                          progress=False)
        cfg = validate_checkpoint(out)
        assert cfg.bits == bits
        errs[bits] = _rel_err(model_dir, out)
        # the report's bits per weight, counted again from the stored tensors the format lists for each matrix
        from vllm_kbvq.format import checkpoint_tensors, expected_matrices

        have, refs = checkpoint_tensors(out), expected_matrices(json.loads((out / "config.json").read_text()), cfg)
        dtype_bits = {"I32": 32, "I16": 16, "U8": 8, "F16": 16, "BF16": 16, "F32": 32}
        stored = sum(math.prod(have[r.name(sfx)][1]) * dtype_bits[have[r.name(sfx)][2]] for r in refs for sfx in r.specs())
        assert report["summary"]["expert_bits_per_weight"] == pytest.approx(stored / sum(r.oc * r.ic for r in refs),
                                                                           rel=1e-12)
        assert report["summary"]["expert_bits_per_weight"] > bits  # the codes, plus codebooks, bases and BCOS
    assert errs[4] < 0.05, errs  # bounded at 4 bits
    assert errs[2] > errs[3] > errs[4], errs  # ordered


def test_default_2bit_settings_and_report(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2_moe")
    report = quantize(model_dir, tmp_path / "q", _tokens(), QuantizeOptions(bits=2, kmeans_iters=10), progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "kbvq" and cfg["codebook_size"] == 256 and cfg["vector_dim"] == 4
    assert cfg["rank"]["experts"] == {"gate": 1, "up": 1, "down": 1}  # round(64/128) -> max(1, .)
    on_disk = json.loads((tmp_path / "q" / "kbvq_report.json").read_text())
    assert on_disk["summary"] == report["summary"]
    layer = on_disk["layers"][0]
    assert set(layer["experts"]) == {"gate", "up", "down"} and "shared_experts" in layer
    assert len(layer["routed_tokens"]) == 8 and sum(layer["routed_tokens"]) == 8 * 64 * 2  # top-2
    for wt in ("gate", "up", "down"):
        e = layer["experts"][wt]
        assert 0 < e["rho"] <= 1
        # BCOS never increases the error it was fitted to reduce
        assert e["rel_err"]["idre_vq_bcos"] <= e["rel_err"]["idre_vq"] + 1e-12
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "q" / f).is_file()
    # the evaluation's weight cache changes nothing, bit for bit, and is not part of the checkpoint
    plain, cached = load_kbvq_model(tmp_path / "q", cpu_kernels=False), load_kbvq_model(tmp_path / "q", cache_weights=True)
    ids = _tokens(2, 48, seed=5)
    assert torch.equal(_logits(plain, ids), _logits(cached, ids))
    assert plain.state_dict().keys() == cached.state_dict().keys()
    assert all(m.vq_cache is not None for m in cached.modules() if hasattr(m, "vq_cache"))
    # a dtype cast after caching rebuilds the cache from the cast codebook instead of keeping a stale one
    plain, cached = plain.to(torch.bfloat16), cached.to(torch.bfloat16)
    assert torch.equal(_logits(plain, ids), _logits(cached, ids))


def test_reference_weight_matches_independent_dequantization(tiny_model, tmp_path):
    model_dir = tiny_model("mixtral")
    out = tmp_path / "q"
    quantize(model_dir, out, _tokens(), QuantizeOptions(bits=3, vector_dim=4, kmeans_iters=5), progress=False)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    p = "model.layers.1.block_sparse_moe.experts.2.w3"
    codes, codebook = tensors[p + ".vq_codes"], tensors[p + ".vq_codebook"].double()
    basis = tensors["model.layers.1.block_sparse_moe.experts.0.w3.lr_b"].double()
    # decode the 12-bit stream of each row bit by bit
    oc, ic = codes.shape[0], 128
    words = codes.tolist()
    w = torch.empty(oc, ic, dtype=torch.float64)
    for r in range(oc):
        stream = "".join(format(x & 0xFFFFFFFF, "032b")[::-1] for x in words[r])
        for j in range(ic // 4):
            idx = int(stream[12 * j : 12 * j + 12][::-1], 2)
            w[r, 4 * j : 4 * j + 4] = codebook[idx]
    w += tensors[p + ".lr_a"].double() @ basis
    model = load_kbvq_model(out)
    lin = model.model.layers[1].mlp.experts[2].w3
    assert torch.allclose(lin.weight_fp32(model.model.layers[1].mlp.experts.basis("up")).double(), w, atol=1e-6)
    x = torch.randn(5, ic, dtype=torch.float64)
    y = (1 + tensors[p + ".affine_s"].double()) * (x @ w.T) + tensors[p + ".affine_b"].double()
    bx = x.float() @ basis.float().T
    assert torch.allclose(lin(x.float(), bx).double(), y, atol=1e-4)


def _cli(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output", str(out), "--nsamples", "4", "--seqlen", "32",
            "--kmeans-iters", "5", "--quiet", *extra]


def test_determinism(tiny_model, tmp_path):
    model_dir, calib = tiny_model("qwen2_moe"), _calib(tmp_path)
    assert cli_main(_cli(model_dir, tmp_path / "a", "--calib", str(calib))) == 0
    assert cli_main(_cli(model_dir, tmp_path / "b", "--calib", str(calib))) == 0
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")


def test_resume_after_kill_is_identical(tmp_path):
    model_dir = six_layer_model(tmp_path / "m")
    calib = _calib(tmp_path)
    args = _cli(model_dir, tmp_path / "killed", "--calib", str(calib), "--kmeans-iters", "60")
    done = stop_after_layers(args, tmp_path / "killed", 2, signal.SIGKILL)
    assert not (tmp_path / "killed").exists()  # nothing loadable left behind
    assert 2 <= len(done) < 6
    assert cli_main(args + ["--resume"]) == 0
    assert not (tmp_path / "killed.kbvq-partial").exists()
    assert cli_main(_cli(model_dir, tmp_path / "straight", "--calib", str(calib), "--kmeans-iters", "60")) == 0
    assert _sha(tmp_path / "killed") == _sha(tmp_path / "straight")


# ---- bad input ---------------------------------------------------------------------------


def _fails(capsys, argv, *needles, out=None):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    if out is not None:
        assert not out.exists() and not out.with_name(out.name + ".kbvq-partial").exists()
    return err


def test_bad_inputs(tiny_model, tmp_path, capsys):
    good, calib = tiny_model("qwen2_moe"), _calib(tmp_path)
    out = tmp_path / "out"
    _fails(capsys, _cli(tmp_path / "nope", out), "does not exist", out=out)
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, _cli(empty, out), "no config.json", out=out)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(good, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    _fails(capsys, _cli(no_weights, out), "no *.safetensors", out=out)

    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import tiny_tokenizer

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    tiny_tokenizer().save_pretrained(llama)
    err = _fails(capsys, _cli(llama, out), "'llama' is not a supported", out=out)
    assert all(name in err for name in ARCH_NAMES), err  # and it lists what is supported

    dense = tmp_path / "dense"
    cfg = tiny_config("qwen2_moe")
    cfg.num_experts = 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    _fails(capsys, _cli(dense, out), "not a Mixture-of-Experts", out=out)

    nan = tmp_path / "nan"
    shutil.copytree(good, nan)
    sd = load_file(nan / "model.safetensors")
    sd["model.layers.1.mlp.experts.3.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, _cli(nan, out), "model.layers.1.mlp.experts.3.up_proj.weight", "NaN", out=out)

    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    _fails(capsys, _cli(good, out, "--calib", str(blank)), "holds no text", out=out)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _fails(capsys, _cli(good, out, "--calib", str(short)), "calibration text has", out=out)
    _fails(capsys, _cli(good, out, "--calib", str(tmp_path / "missing.jsonl")), "does not exist", out=out)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user data")
    _fails(capsys, _cli(good, existing, "--calib", str(calib)), "not a kbvq-quantize output", "choose another")
    assert (existing / "keep.txt").read_text() == "user data"

    with pytest.raises(SystemExit) as e:
        cli_main(_cli(good, out, "--bits", "5"))
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    # KBVQ-only options on a scalar baseline are refused, not ignored
    _fails(capsys, _cli(good, out, "--method", "gptq", "--finetune-steps", "8"),
           "--finetune-steps applies to --method kbvq only", out=out)
    _fails(capsys, _cli(good, out, "--method", "rtn", "--row-scale"), "--row-scale applies to --method kbvq", out=out)
    with pytest.raises(SystemExit) as e:
        cli_main(_cli(good, out, "--finetune-steps", "-1"))
    assert e.value.code == 2 and "--finetune-steps: must be >= 0" in capsys.readouterr().err


# ---- bad checkpoints at load --------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    model_dir = make_tiny_model("qwen2_moe", d / "m")
    quantize(model_dir, d / "q", _tokens(), QuantizeOptions(bits=2, kmeans_iters=3, compare_plain_vq=False),
             progress=False)
    return d / "q"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_fails_at_load(quantized, tmp_path, case):
    ckpt, needle = broken_copy(quantized, tmp_path / "c", case)
    with pytest.raises(FormatError) as e:
        load_kbvq_model(ckpt)
    assert needle in str(e.value)


def test_skipped_plain_vq_comparison_is_reported_as_absent(tiny_model, tmp_path):
    report = quantize(tiny_model("mixtral"), tmp_path / "q", _tokens(),
                      QuantizeOptions(bits=2, kmeans_iters=3, compare_plain_vq=False), progress=False)
    for key, e in report["summary"]["mean_output_rel_err"].items():  # the mean over the layers' own figures
        group, wtype = key.split(".")
        rows = [layer[group][wtype]["rel_err"] for layer in report["layers"]]
        assert e["plain_vq"] is None and all(r["plain_vq"] is None for r in rows)
        assert e["idre_vq"] == pytest.approx(sum(r["idre_vq"] for r in rows) / len(rows), rel=1e-12) and e["idre_vq"] > 0
        assert e["layers"] == len(rows) == len(report["layers"]) and e["layers_kbvq_below_plain_vq"] is None
    from quantize_tools.report import format_summary

    assert "plain VQ not run" in format_summary(report)


def test_gptvq_assignment_lowers_calibration_output_error(tiny_model, tmp_path):
    """Same seed, same k-means codebooks: the Hessian-aware assignment must cut the output error it targets."""
    model_dir = tiny_model("mixtral")
    errs = {}
    for method in ("kmeans", "gptvq"):
        opts = QuantizeOptions(bits=2, vector_dim=2, kmeans_iters=10, vq_method=method, bcos=False,
                               compare_plain_vq=False)
        # enough tokens per expert (about 1000 for 128 inputs) that the Hessian does not overfit
        report = quantize(model_dir, tmp_path / method, _tokens(n=32), opts, progress=False)
        assert validate_checkpoint(tmp_path / method).vq_method == method
        errs[method] = sum(layer["experts"][wt]["rel_err"]["idre_vq"] for layer in report["layers"]
                           for wt in ("gate", "up", "down"))
    assert errs["gptvq"] < 0.9 * errs["kmeans"], errs
    assert _rel_err(model_dir, tmp_path / "gptvq") < _rel_err(model_dir, tmp_path / "kmeans")
