"""Greedy generation with vLLM (CPU build) in its own process; writes token ids and top-k logprobs as JSON.

vLLM keeps global state, so each test run uses a fresh interpreter:
``python tests/helpers/vllm_generate.py MODEL OUT.json [--eager] [--tp N]``. At ``--tp 1`` the engine and its
worker run inside it (the in-process engine and the ``uni`` executor: the same model code, plugin and
compiled graph, 15-20 s less per run on the 2-core CI machine than spawning both); the
tensor-parallel tests and the HTTP-server test take the multi-process path that ``vllm serve`` takes.
Weight tracking is on, so a checkpoint tensor that no parameter takes fails the load.
"""
import argparse
import json
import os


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--logprobs", type=int, default=5)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {}
    with open(os.path.join(a.model, "config.json")) as f:
        mla = "kv_lora_rank" in json.load(f)
    if mla and a.dtype == "float32":
        # vLLM prefers its AMX MLA backend on CPUs with AMX tiles, and that backend takes bf16/fp16
        # weights only: a float32 comparison needs the reference CPU MLA backend.
        extra["attention_backend"] = "CPU_MLA"
    if a.tp > 1:
        extra["tensor_parallel_size"] = a.tp
        extra["distributed_executor_backend"] = "mp"
        # vLLM's CPU build binds each rank's threads to a NUMA node unless told which cores to use;
        # with one node (these machines) it refuses TP > 1, so give each rank one core of ours.
        cores = sorted(os.sched_getaffinity(0))[: a.tp]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cores)))
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        extra["distributed_executor_backend"] = "uni"
    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=512, enforce_eager=a.eager, seed=0,
              model_loader_extra_config={"enable_weights_track": True}, **extra)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(a.prompts)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=a.max_tokens, logprobs=a.logprobs,
                                                ignore_eos=True))
    res = [{"ids": list(o.outputs[0].token_ids),
            "logprobs": [{str(k): v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs]}
           for o in outs]
    with open(a.out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
