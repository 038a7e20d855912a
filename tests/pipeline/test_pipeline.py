"""End to end on a tiny random Llama: llmq run → files on disk → from_pretrained → identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.errors import BadInputError, LlmqError


def _in_memory_quantized(recipe_dict):
    model = AutoModelForCausalLM.from_pretrained(recipe_dict["model"], dtype=torch.float32).eval()
    llmq.quantize(model, llmq.Recipe.from_dict(recipe_dict))
    return model


@pytest.mark.parametrize(
    "scheme, clip",
    [
        ({"bits": 4, "group_size": 32, "symmetric": False}, "minmax"),
        ({"bits": 3, "group_size": 64, "symmetric": True}, "mse"),
        ({"bits": 2, "group_size": 32, "symmetric": False}, "minmax"),
        ({"bits": 8, "group_size": None, "symmetric": True}, "minmax"),
    ],
)
def test_run_save_reload_identical_logits(tiny_recipe, scheme, clip):
    tiny_recipe["scheme"] = scheme
    tiny_recipe["method"] = {"name": "rtn", "clip": clip}
    result = llmq.run(tiny_recipe)
    out = result.output_dir
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "report.json", "README.md", "recipe.yaml"} <= files
    assert {"model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"} <= files  # 2 blocks + the rest
    assert not {"llmq-progress.json", "llmq-activations.pt"} & files
    assert not list(out.parent.glob(".*tmp*")) and not list(out.parent.glob(".*partial")), "no leftovers after success"

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    qlayers = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head ignored
    assert not isinstance(reloaded.lm_head, QuantLinear)

    in_memory = _in_memory_quantized(tiny_recipe)
    x = torch.randint(0, reloaded.config.vocab_size, (3, 17))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, in_memory(x).logits)

    report = json.loads((out / "report.json").read_text())
    assert report["report_version"] == 2 and report["recipe_hash"] == result.recipe.hash()
    assert report["command"] == f"llmq run recipe.yaml -o {out}"
    assert report["quantization"]["peak_rss_mb"] >= 50  # the resident set while quantizing (a torch process: > 50 MB)
    for key in ("base", "quantized"):
        m = report["metrics"][key]
        assert m["windows"] == 4 and m["seqlen"] == 64 and m["tokens"] == 4 * 63 and m["ppl"] > 1
    assert report["sizes"]["quantized_bytes"] > 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" in card and f"{report['metrics']['quantized']['ppl']:.3f}" in card


def test_quantized_perplexity_ordering(tiny_recipe):
    """Quantization error grows as bits shrink: W8 stays near base, W2 moves much further."""
    res = {}
    for bits, group in ((8, None), (2, 32)):
        tiny_recipe["scheme"] = {"bits": bits, "group_size": group, "symmetric": bits == 8}
        tiny_recipe["output"]["dir"] = tiny_recipe["output"]["dir"] + f"-{bits}"
        res[bits] = llmq.run(tiny_recipe).metrics
    base = res[8]["base"]["ppl"]
    assert abs(res[8]["quantized"]["ppl"] / base - 1) < 0.01
    assert abs(res[2]["quantized"]["ppl"] / base - 1) > abs(res[8]["quantized"]["ppl"] / base - 1)


def test_existing_output_is_refused_then_overwritten(tiny_recipe):
    tiny_recipe["eval"] = None
    first = llmq.run(tiny_recipe)
    config = first.output_dir / "config.json"
    stamp = config.stat().st_mtime_ns
    with pytest.raises(BadInputError, match="already exists"):
        llmq.run(tiny_recipe)
    assert config.stat().st_mtime_ns == stamp
    llmq.run(tiny_recipe, overwrite=True)
    assert config.stat().st_mtime_ns != stamp


def test_group_size_error_names_layer_before_work(tiny_recipe):
    tiny_recipe["scheme"]["group_size"] = 48  # divides 64? no: names the first layer it does not divide
    with pytest.raises(BadInputError, match=r"48 does not divide in_features 64 of model\.layers\.0\.self_attn\.q_proj"):
        llmq.run(tiny_recipe)
    assert not Path(tiny_recipe["output"]["dir"]).exists()


def test_crash_while_quantizing_leaves_nothing_that_loads(tiny_recipe, monkeypatch):
    """A failure after the first block's shard: no output folder; the partial work has no config.json."""
    from llmq.quantization import blockwise

    writes = []
    real_save = blockwise._save_atomic

    def save_then_fail(tensors, path):
        writes.append(path.name)
        if len(writes) == 3:  # the rest shard, block 0's shard, then block 1's: disk full
            raise RuntimeError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(blockwise, "_save_atomic", save_then_fail)
    tiny_recipe["eval"] = None
    with pytest.raises(RuntimeError, match="disk full"):
        llmq.run(tiny_recipe)
    out = Path(tiny_recipe["output"]["dir"])
    assert not out.exists()
    partial = llmq.io.partial_dir(out)
    assert not (partial / "config.json").exists(), "unfinished work must never look like a checkpoint"


def test_ctrl_c_while_quantizing_then_rerun_resumes(tiny_recipe, tmp_path):
    """A real SIGINT after block 0 is written: the CLI exits 130 and no output folder exists; the rerun resumes
    at block 1 and produces the same bytes as an uninterrupted run."""
    import yaml

    tiny_recipe["eval"] = None
    tiny_recipe["method"] = {"name": "gptq"}
    tiny_recipe["calibration"] = {"data": str(_calibration_file(tmp_path)), "n_samples": 4, "seqlen": 32, "batch_size": 2}
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe))
    # Ctrl-C once block 0 is recorded; the main thread gets it (as from a terminal) at the end of block 1, and the
    # write of block 1 that is then in flight never gets recorded, as if the process died there
    script = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts us with SIGINT ignored
from llmq.quantization import blockwise
recorded = []
orig_record, orig_trim = blockwise._write_json_atomic, blockwise.memory.trim
def record(obj, path):
    if not recorded:
        orig_record(obj, path)
    recorded.append(obj["blocks_done"])
def trim():
    orig_trim()
    if recorded:
        os.kill(os.getpid(), signal.SIGINT)
blockwise._write_json_atomic, blockwise.memory.trim = record, trim
from llmq.cli import main
sys.exit(main(["run", {str(recipe_path)!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    out = Path(tiny_recipe["output"]["dir"])
    assert not out.exists()
    partial = llmq.io.partial_dir(out)
    assert (partial / "llmq-progress.json").exists() and not (partial / "config.json").exists()

    resumed = llmq.run(recipe_path)
    assert resumed.report["quantization"]["resumed_at_block"] == 1
    assert not partial.exists()
    llmq.run(recipe_path, output_dir=tmp_path / "fresh")
    for f in sorted(out.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "fresh" / f.name).read_bytes(), f.name


def _calibration_file(folder: Path) -> Path:
    from conftest import TEXT

    path = folder / "calib.txt"
    path.write_text(TEXT[::-1] * 2)  # different text from the evaluation corpus
    return path


def test_resume_refuses_edited_calibration_text_or_base_files(tiny_recipe, tmp_path, monkeypatch):
    """A partial run resumes only into the same job: an edited calibration file or a re-written base model (new
    file times) is refused with a message, never resumed into mixed blocks; the original job still resumes."""
    import shutil

    from conftest import killed_at_block_1

    base = tmp_path / "base"
    shutil.copytree(tiny_recipe["model"], base)
    calib = _calibration_file(tmp_path)
    tiny_recipe.update(model=str(base), eval=None, method={"name": "gptq"},
                       calibration={"data": str(calib), "n_samples": 4, "seqlen": 32, "batch_size": 2})
    with killed_at_block_1(monkeypatch), pytest.raises(RuntimeError, match="killed"):
        llmq.run(tiny_recipe)
    partial = llmq.io.partial_dir(Path(tiny_recipe["output"]["dir"]))
    assert json.loads((partial / "llmq-progress.json").read_text())["blocks_done"] == 1

    text = calib.read_text()
    calib.write_text(text.replace("a", "o"))  # same recipe, other calibration tokens
    with pytest.raises(LlmqError, match="different recipe, model or calibration data"):
        llmq.run(tiny_recipe)
    calib.write_text(text)
    weights = base / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as after a re-download
    with pytest.raises(LlmqError, match="different recipe, model or calibration data"):
        llmq.run(tiny_recipe)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert llmq.run(tiny_recipe).report["quantization"]["resumed_at_block"] == 1


def _saved_checkpoint(tiny_recipe) -> Path:
    tiny_recipe["eval"] = None
    return llmq.run(tiny_recipe).output_dir


def test_truncated_safetensors_is_refused(tiny_recipe):
    out = _saved_checkpoint(tiny_recipe)
    f = out / "model-00002-of-00003.safetensors"  # block 1's shard
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmqError, match="corrupt or truncated"):
        llmq.load(out)


def test_corrupt_header_is_refused(tiny_recipe):
    out = _saved_checkpoint(tiny_recipe)
    f = out / "model-00002-of-00003.safetensors"  # block 1's shard
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(LlmqError, match="corrupt or truncated"):
        llmq.load(out)


def test_missing_layer_tensor_is_refused(tiny_recipe):
    from safetensors.torch import load_file, save_file

    out = _saved_checkpoint(tiny_recipe)
    f = out / "model-00002-of-00003.safetensors"  # block 1's shard
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.qweight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(LlmqError, match=r"lacks model\.layers\.1\.mlp\.down_proj\.qweight"):
        llmq.load(out)


def test_loaded_without_llmq_registered_is_refused(tiny_recipe, monkeypatch):
    """transformers loads an unknown quant_method as random Linear weights; llmq's loaders refuse such a model."""
    from transformers.quantizers import auto

    out = _saved_checkpoint(tiny_recipe)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "llmq")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "llmq")
    model = AutoModelForCausalLM.from_pretrained(out)  # what a user without `import llmq` would get
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(LlmqError, match="without llmq registered"):
        llmq.checkpoint.hf.check_loaded(model)


def test_foreign_checkpoint_is_not_mistaken_for_llmq(tiny_model_dir):
    """A plain full-precision folder loads as itself; check_loaded accepts it."""
    model = llmq.load(tiny_model_dir)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_newer_format_version_is_refused(tiny_recipe):
    out = _saved_checkpoint(tiny_recipe)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmqError, match="format version 99"):
        llmq.load(out)


def test_run_in_a_subprocess_from_python_api(tiny_recipe, tmp_path):
    """`import llmq; llmq.run(path)` from a fresh interpreter, as the README shows."""
    import yaml

    tiny_recipe["eval"] = None
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe))
    code = f"import llmq; r = llmq.run({str(p)!r}); print('OUT', r.output_dir)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "OUT" in proc.stdout


def test_reload_in_half_precision(tiny_recipe):
    """from_pretrained(dtype=float16) builds fp16 scales; the dequantized weights match fp32 ones to fp16 rounding."""
    out = _saved_checkpoint(tiny_recipe)
    m32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    m16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    from llmq.kernels.torch_ref import dequantized_weight

    l32, l16 = m32.model.layers[0].mlp.up_proj, m16.model.layers[0].mlp.up_proj
    assert l16.scales.dtype == torch.float16 and torch.equal(l16.qweight, l32.qweight)
    torch.testing.assert_close(dequantized_weight(l16).float(), dequantized_weight(l32), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_output_round_trips(tiny_recipe, dtype):
    tiny_recipe["output"]["dtype"] = dtype
    result = llmq.run(tiny_recipe)
    reloaded = llmq.load(result.output_dir)
    layer = reloaded.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == getattr(torch, dtype)
    in_memory = _in_memory_quantized(tiny_recipe)
    x = torch.randint(0, reloaded.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, in_memory(x).logits)
    assert result.metrics["quantized"]["ppl"] > 1


def test_output_dtype_auto_follows_the_base_checkpoint(tmp_path):
    """output.dtype defaults to auto: a bf16 base writes bf16 scales, embeddings and norms (not widened to fp32);
    naming a dtype still wins; the in-memory API follows the model's own dtype."""
    from conftest import make_tiny_llama
    from safetensors import safe_open

    base = tmp_path / "bf16"
    make_tiny_llama(base).to(torch.bfloat16).save_pretrained(base)
    assert llmq.Recipe.from_dict({"model": str(base)}).output.dtype == "auto"
    dtypes = {}
    for name, extra in (("auto", {}), ("fp32", {"dtype": "float32"})):
        out = llmq.run({"model": str(base), "method": "rtn", "scheme": {"bits": 4, "group_size": 32}, "eval": None,
                        "output": {"dir": str(tmp_path / name), **extra}}).output_dir
        with safe_open(next(out.glob("*-00003-of-00003.safetensors")), "pt") as f:
            dtypes[name] = (f.get_tensor("model.embed_tokens.weight").dtype, f.get_tensor("model.norm.weight").dtype)
        with safe_open(next(out.glob("*-00001-of-00003.safetensors")), "pt") as f:
            dtypes[name] += (f.get_tensor("model.layers.0.mlp.up_proj.scales").dtype,)
    assert dtypes == {"auto": (torch.bfloat16,) * 3, "fp32": (torch.float32,) * 3}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    llmq.quantize(model, llmq.Recipe.from_dict({"model": str(base), "method": "rtn", "scheme": {"group_size": 32}}))
    assert model.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
