"""End to end on the real SmolLM2-135M (built-in alias, no network): the numbers must make sense.

Slow (about 6 minutes on 2 cores, plus a one-time GGUF conversion): run with `make test-slow` or `-m slow`.
"""

from __future__ import annotations

import pytest

import llmq

pytestmark = pytest.mark.slow


def _run(tmp_path, name, scheme, baseline):
    recipe = {
        "name": name,
        "model": "smollm2-135m",
        "method": "rtn",
        "scheme": scheme,
        "eval": {"data": "wiki", "seqlen": 2048, "max_windows": 4, "baseline": baseline},
        "output": {"dir": str(tmp_path / name)},
    }
    return llmq.run(recipe).metrics


def test_smollm2_w8_near_base_and_w4_between_base_and_1_5x(tmp_path):
    w8 = _run(tmp_path, "w8", {"bits": 8, "group_size": None, "symmetric": True}, baseline=True)
    base = w8["base"]["ppl"]
    assert 5 < base < 60, f"base perplexity {base} is implausible for SmolLM2-135M on Wikipedia text"
    assert w8["base"]["tokens"] == 4 * 2047
    assert abs(w8["quantized"]["ppl"] / base - 1) < 0.01, (w8["quantized"]["ppl"], base)

    w4 = _run(tmp_path, "w4", {"bits": 4, "group_size": 64, "symmetric": False}, baseline=False)
    assert base < w4["quantized"]["ppl"] < 1.5 * base, (w4["quantized"]["ppl"], base)


def test_gptq_recipe_beats_rtn_at_3_bits(tmp_path):
    """The shipped GPTQ W3g64 recipe as it is (calibration 64 x 512 lambada tokens), evaluated on 4 windows:
    far better than RTN at the same scheme (16-window numbers: GPTQ 34.5 vs RTN 58.8), every layer calibrated."""
    from pathlib import Path

    recipe = llmq.Recipe.from_yaml(Path(__file__).parent.parent / "recipes" / "gptq-w3g64.yaml").to_dict()
    recipe["eval"]["max_windows"] = 4
    recipe["eval"]["baseline"] = False
    recipe["output"]["dir"] = str(tmp_path / "gptq")
    result = llmq.run(recipe)
    assert len(result.report["layers"]) == 210 and all(r["method"] == "gptq" for r in result.report["layers"])
    rtn = _run(tmp_path, "rtn-w3", {"bits": 3, "group_size": 64, "symmetric": False}, baseline=False)
    assert result.metrics["quantized"]["ppl"] < 0.8 * rtn["quantized"]["ppl"], (result.metrics, rtn)


def test_smollm2_exports_load_in_transformers_and_import_back_exactly(tmp_path):
    """W4g64 asymmetric RTN on SmolLM2: GPTQ and compressed-tensors exports import back to byte-identical llmq
    tensors, and the GPTQ export loads in plain transformers (optimum + gptqmodel). GPTQModel's CPU kernel here runs
    bf16 activations through 30 blocks, so its logits must match llmq's within 2^-7 of the largest logit (bf16
    rounding; measured 3.6e-3 on GPTQ W4g64, benchmarks/results/interop_smollm2.md), not the fp16 bound of the tiny tests."""
    import json
    import subprocess
    import sys

    import torch
    from test_formats import PEER_LOADER, tensors

    from llmq import formats
    from llmq.kernels.dense import exact_dense

    recipe = {"name": "w4", "model": "smollm2-135m", "method": "rtn", "scheme": {"bits": 4, "group_size": 64, "symmetric": False},
              "eval": None, "output": {"dir": str(tmp_path / "w4")}}
    src = llmq.run(recipe).output_dir
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    model = llmq.load(src, dtype=torch.float32)
    with torch.no_grad(), exact_dense(model):  # llmq's exact fp32 logits (not the CPU kernel's bf16 inside)
        ref = model(ids).logits
    for fmt in ("gptq", "compressed-tensors"):
        done = formats.export_checkpoint(src, tmp_path / fmt, fmt, gptq_version=2)
        back = formats.import_checkpoint(done.output_dir, tmp_path / f"{fmt}-back")
        a, b = tensors(src), tensors(back.output_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fmt
    torch.save(ids, tmp_path / "ids.pt")
    job = json.dumps([[str(tmp_path / "gptq"), str(tmp_path / "peer.pt")]])
    proc = subprocess.run([sys.executable, "-c", PEER_LOADER, job, str(tmp_path / "ids.pt")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "peer.pt")
    if "TorchFusedLinear" in got["kinds"]:
        pytest.xfail("GPTQModel's CPU fused kernel (no AVX512-BF16 here) drops zero points; see test_formats.py")
    got = got["logits"]
    assert (got - ref).abs().max().item() <= 2.0**-7 * ref.abs().max().item()
