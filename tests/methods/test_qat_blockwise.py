"""Block-wise QAT (Block-AP) in the block walk: it lowers each block's output error below its PTQ start, converts to
exact integers, saves and reloads to the same logits, resumes to the same bytes, and is validated like any method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq import numerics
from llmq.calibration import capture_inputs, linear_clusters
from llmq.errors import BadInputError
from llmq.methods import BlockJob, block_method
from llmq.methods.qat.block_ap import block_mse
from llmq.model.structure import decoder_blocks
from llmq.recipe import Recipe


def _calibration_file(folder: Path) -> str:
    from conftest import TEXT

    path = folder / "calib.txt"
    path.write_text(TEXT[::-1] * 2)
    return str(path)


def _blockwise(tiny_recipe, tmp_path, init="rtn", **method) -> dict:
    tiny_recipe["method"] = {"name": "qat", "mode": "blockwise", "init": init, "block_epochs": 4, "block_lr": 1e-5,
                             "block_qparam_lr": 1e-5, **method}
    tiny_recipe["scheme"] = {"bits": 3, "group_size": 32, "symmetric": False}
    tiny_recipe["calibration"] = {"data": _calibration_file(tmp_path), "n_samples": 8, "seqlen": 32, "batch_size": 2}
    return tiny_recipe


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_training_lowers_the_block_output_error_below_its_ptq_start(tiny_recipe, tmp_path, init):
    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init=init))
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    _, blocks = decoder_blocks(model)
    inputs = capture_inputs(model, blocks[0], list(torch.split(ids, 2)), "cpu")
    rows = []
    job = BlockJob(recipe.scheme.to_scheme(), recipe.method, torch.float32, inputs, linear_clusters(blocks[0], inputs),
                   rows.append)
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]
    targets = inputs.outputs(blocks[0])  # the full-precision block's outputs
    qweights = block_method(recipe.method).quantize_block(blocks[0], names, job)
    trained = [r for r in rows if r["method"] == "qat-block"]
    assert len(trained) == len(names) and trained[0]["loss"] < trained[0]["init_loss"]
    assert block_mse(blocks[0], job, targets) == pytest.approx(trained[0]["loss"], rel=1e-6)
    for name, qw in qweights.items():  # the block now holds exactly the integers' weights, as plain Linear layers
        layer = blocks[0].get_submodule(name)
        assert type(layer) is torch.nn.Linear and not layer.weight.requires_grad
        assert torch.equal(layer.weight, numerics.dequantize(qw, recipe.scheme.to_scheme()))


def test_run_saves_and_reloads_what_it_trained(tiny_recipe, tmp_path):
    recipe = _blockwise(tiny_recipe, tmp_path, init="gptq", act_order=True)
    result = llmq.run(recipe)
    report = json.loads((result.output_dir / "report.json").read_text())
    rows = [r for r in report["layers"] if r["method"] == "qat-block"]
    assert len(rows) == 14 and all(r["loss"] < r["init_loss"] for r in rows)
    assert report["metrics"]["quantized"]["ppl"] > 1 and "mode: blockwise" in (result.output_dir / "README.md").read_text()

    reloaded = llmq.load(result.output_dir)
    model = AutoModelForCausalLM.from_pretrained(recipe["model"], dtype=torch.float32).eval()
    r = Recipe.from_dict(recipe)
    windows = llmq.calibration.calibration_batches(r.calibration, llmq.loading.load_tokenizer(recipe["model"]))
    llmq.quantize(model, r, calibration=windows)
    x = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_a_killed_blockwise_run_resumes_to_the_same_bytes(tiny_recipe, tmp_path, monkeypatch):
    from conftest import killed_at_block_1

    recipe = _blockwise(tiny_recipe, tmp_path)
    recipe["eval"] = None
    with killed_at_block_1(monkeypatch), pytest.raises(RuntimeError, match="killed"):
        llmq.run(recipe)
    resumed = llmq.run(recipe)
    assert resumed.report["quantization"]["resumed_at_block"] == 1
    fresh = llmq.run(recipe, output_dir=tmp_path / "fresh")
    for f in sorted(resumed.output_dir.glob("*.safetensors")):
        assert f.read_bytes() == (fresh.output_dir / f.name).read_bytes(), f.name


def test_blockwise_keys_are_refused_elsewhere():
    with pytest.raises(BadInputError, match="block_epochs applies to qat with mode: blockwise only"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "block_epochs": 3}})
    with pytest.raises(BadInputError, match="mode applies to method qat only"):
        Recipe.from_dict({"model": "m", "method": {"name": "gptq", "mode": "blockwise"}})
    r = Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise"}})
    assert r.method.blockwise and llmq.methods.needs_calibration(r.method)
