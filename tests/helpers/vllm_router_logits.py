"""Router inputs and logits of every MoE layer as vLLM (CPU build) computes them, one prompt at a time.

``python tests/helpers/vllm_router_logits.py MODEL OUT.pt --prompts '[[ids], ...]' [--dtype bfloat16]``
writes, per prompt, ``{"x": [layers, tokens, hidden], "logits": [layers, tokens, E]}`` (torch.save).
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager (no torch.compile),
so forward hooks on each layer's ``mlp.gate`` see what vLLM's top-k routing starts from.
"""
import argparse
import json
import os
import re

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=512, enforce_eager=True, seed=0,
              enable_prefix_caching=False, compilation_config={"mode": 0})
    calls = []

    def install(model):
        n = 0
        for name, mod in model.named_modules():
            m = re.fullmatch(r".*layers\.(\d+)\.mlp\.gate", name)
            if m:
                li = int(m.group(1))  # bound as the hook's default: the loop rebinds it
                mod.register_forward_hook(
                    lambda mod, inp, out, li=li: calls.append((li, inp[0].cpu(), out[0].cpu())))
                n += 1
        return n

    hooked = llm.apply_model(install)[0]
    res = []
    for ids in json.loads(a.prompts):
        calls.clear()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
        prefill = {}
        for li, x, logits in calls:  # the prefill is each layer's first call over all prompt tokens
            if logits.shape[0] == len(ids) and li not in prefill:
                prefill[li] = (x, logits)
        assert len(prefill) == hooked, f"saw the prefill of {len(prefill)} of {hooked} MoE layers"
        res.append({"x": torch.stack([prefill[li][0] for li in sorted(prefill)]),
                    "logits": torch.stack([prefill[li][1] for li in sorted(prefill)])})
    torch.save(res, a.out)


if __name__ == "__main__":
    main()
