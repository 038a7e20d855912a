"""Block-wise QAT (Block-AP) in the block walk: it lowers each block's output error below its PTQ start, converts to
exact integers, saves and reloads to the same logits, resumes to the same bytes, and is validated like any method."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq import numerics
from llmq.calibration import capture_inputs, linear_clusters
from llmq.calibration.capture import first_output
from llmq.errors import BadInputError
from llmq.methods import BlockJob, block_method
from llmq.methods.gptq import gptq_block
from llmq.methods.qat.block_ap import StepBudget, stream_mse
from llmq.methods.qat.fake_quant import RoundingLinear
from llmq.model.structure import decoder_blocks
from llmq.recipe import Recipe


def _calibration_file(folder: Path) -> str:
    from conftest import TEXT

    path = folder / "calib.txt"
    path.write_text(TEXT[::-1] * 2)
    return str(path)


def _blockwise(tiny_recipe, tmp_path, init="rtn", bits=3, **method) -> dict:
    tiny_recipe["method"] = {"name": "qat", "mode": "blockwise", "init": init, "block_epochs": 4, "block_lr": 0.05,
                             "block_qparam_lr": 0.01, **method}
    tiny_recipe["scheme"] = {"bits": bits, "group_size": 32, "symmetric": False}
    tiny_recipe["calibration"] = {"data": _calibration_file(tmp_path), "n_samples": 8, "seqlen": 32, "batch_size": 2}
    return tiny_recipe


def _first_block_job(recipe: Recipe):
    """The tiny model, its first block, a job on seeded random token windows, with the full-precision outputs as
    targets (what the walk hands block 0), and the rows the method logs."""
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    _, blocks = decoder_blocks(model)
    inputs = capture_inputs(model, blocks[0], list(torch.split(ids, 2)), "cpu")
    rows = []
    job = BlockJob(recipe.scheme.to_scheme(), recipe.method, torch.float32, inputs, linear_clusters(blocks[0], inputs),
                   rows.append, targets=inputs.outputs(blocks[0]))
    names = [n for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]
    return blocks[0], names, job, rows


def _error_after(block, job, entering: list[torch.Tensor]) -> float:
    """The finished block's output error, recomputed from the inputs that entered it; the method must already have
    advanced the job's activations to exactly those outputs (once: the walk does not advance a QAT block again)."""
    outputs = [first_output(block(h, *a, **k)) for h, (a, k) in zip(entering, job.inputs.extras)]
    assert job.advanced and all(torch.equal(o, h) for o, h in zip(outputs, job.inputs.hidden))
    return stream_mse(outputs, job.targets)


@pytest.mark.parametrize("init", ["rtn", "gptq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_training_lowers_the_block_output_error_below_its_ptq_start(tiny_recipe, tmp_path, init, bits):
    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init=init, bits=bits))
    block, names, job, rows = _first_block_job(recipe)
    entering = [h.clone() for h in job.inputs.hidden]
    qweights = block_method(recipe.method).quantize_block(block, names, job)
    trained = [r for r in rows if r["method"] == "qat-block"]
    assert len(trained) == len(names) and trained[0]["steps"] == 16
    assert trained[0]["loss"] < trained[0]["init_loss"]
    assert _error_after(block, job, entering) == pytest.approx(trained[0]["loss"], rel=1e-6)
    for name, qw in qweights.items():  # the block now holds exactly the integers' weights, as plain Linear layers
        layer = block.get_submodule(name)
        assert type(layer) is torch.nn.Linear and not layer.weight.requires_grad
        assert torch.equal(layer.weight, numerics.dequantize(qw, recipe.scheme.to_scheme()))
        assert int(qw.q.max()) <= (1 << bits) - 1


def test_training_runs_under_bf16_autocast_on_a_gpu_and_converts_exactly(tiny_recipe, tmp_path, monkeypatch):
    """On a GPU the training forward runs in bf16 autocast. No GPU here: the same wiring is driven with the CPU's
    bf16 autocast. It must still lower the error, leave the block holding exactly its integers (conversion and the
    logged losses are fp32, outside autocast), and train differently from fp32 (so autocast really was on)."""
    from contextlib import nullcontext

    from llmq.methods.qat import block_ap

    with pytest.warns(UserWarning, match="CUDA"):  # torch disables a CUDA autocast on a machine without CUDA
        on_gpu = block_ap.training_autocast(torch.device("cuda"))
    assert isinstance(on_gpu, torch.autocast) and on_gpu.fast_dtype == torch.bfloat16
    assert isinstance(block_ap.training_autocast(torch.device("cpu")), nullcontext)

    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init="gptq", block_lr=0.0))
    trained = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16":
            monkeypatch.setattr(block_ap, "training_autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
        block, names, job, rows = _first_block_job(recipe)
        entering = [h.clone() for h in job.inputs.hidden]
        trained[precision] = block_method(recipe.method).quantize_block(block, names, job)
        assert rows[-1]["loss"] < rows[-1]["init_loss"]
        assert _error_after(block, job, entering) == pytest.approx(rows[-1]["loss"], rel=1e-6)
        for name, qw in trained[precision].items():
            assert torch.equal(block.get_submodule(name).weight, numerics.dequantize(qw, recipe.scheme.to_scheme()))
    assert any(not torch.equal(trained["fp32"][n].scales, trained["bf16"][n].scales) for n in names)


def test_a_block_trained_for_zero_steps_keeps_its_init_exactly(tiny_recipe, tmp_path):
    """Zero steps (a time budget with no room to train): the integers, scales and zero points are GPTQ's, bit for bit."""
    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init="gptq"))
    block, names, job, rows = _first_block_job(recipe)
    init = gptq_block(copy.deepcopy(block), names, dataclasses.replace(job, log=lambda row: None))
    job.step_budget = StepBudget(seconds=60.0, n_blocks=2, started=0.0, steps=0)
    trained = block_method(recipe.method).quantize_block(block, names, job)  # (advances job.inputs in place)
    assert rows[-1]["steps"] == 0 and rows[-1]["loss"] == rows[-1]["init_loss"]
    for name in names:
        for a, b in zip(trained[name], init[name]):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_learned_rounding_moves_codes_and_lowers_the_error(tiny_recipe, tmp_path):
    """Rounding offsets alone (scales frozen), with a rate large enough to cross ±0.5: some codes change, only by
    whole steps within the grid, the error falls below GPTQ's, and the block holds exactly the integers it logs.
    (Offsets need room to settle: with 16 steps they still oscillate and can end above GPTQ; 32 steps here.)"""
    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init="gptq", learn_scales=False, block_lr=0.1,
                                         block_epochs=8))
    block, names, job, rows = _first_block_job(recipe)
    entering = [h.clone() for h in job.inputs.hidden]
    init = gptq_block(copy.deepcopy(block), names, dataclasses.replace(job, log=lambda row: None))
    trained = block_method(recipe.method).quantize_block(block, names, job)
    moved = sum(int((trained[n].q != init[n].q).sum()) for n in names)
    assert moved > 0 and rows[-1]["loss"] < rows[-1]["init_loss"]
    assert _error_after(block, job, entering) == pytest.approx(rows[-1]["loss"], rel=1e-6)
    for n in names:
        assert torch.equal(trained[n].scales, init[n].scales) and int(trained[n].q.max()) <= 7


def test_an_untrainable_first_block_leaves_the_plan_to_the_next(tiny_recipe, tmp_path):
    """Block 0's layers all kept in full precision by an override: nothing is timed there (a plan from an empty
    block would promise millions of steps); block 1 makes the plan."""
    recipe = _blockwise(tiny_recipe, tmp_path, block_minutes=0.1)
    del recipe["method"]["block_epochs"]
    recipe["overrides"] = [{"targets": [r".*layers\.0\..*"], "skip": True}]
    recipe["eval"] = None
    result = llmq.run(recipe)
    steps = {r["block"]: r["steps"] for r in result.report["layers"] if r["method"] == "qat-block"}
    assert list(steps) == ["1"] and steps["1"] < 10_000


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


def test_the_walk_advances_the_activations_through_each_block_once(tiny_recipe, tmp_path, monkeypatch):
    """Block-wise QAT advances the activations through its finished block itself (in the pass that measures the
    error after training); the walk must not advance them a second time."""
    from llmq.calibration.capture import BlockInputs

    advanced = []
    real_advance = BlockInputs.advance
    monkeypatch.setattr(BlockInputs, "advance", lambda self, block: (advanced.append(block), real_advance(self, block)))
    r = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, block_epochs=1))
    model = AutoModelForCausalLM.from_pretrained(r.model, dtype=torch.float32).eval()
    _, blocks = decoder_blocks(model)
    llmq.quantize(model, r, calibration=llmq.calibration.calibration_batches(
        r.calibration, llmq.loading.load_tokenizer(r.model)))
    assert len(blocks) > 1 and [id(b) for b in advanced] == [id(b) for b in blocks]


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
    with pytest.raises(BadInputError, match="learn_zero_points: block-wise QAT keeps the init's integer zero points"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise", "learn_zero_points": True}})
    with pytest.raises(BadInputError, match="give block_epochs or block_minutes, not both"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise", "block_epochs": 2,
                                                   "block_minutes": 3}})
    with pytest.raises(BadInputError, match="block_minutes applies to qat with mode: blockwise only"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "block_minutes": 3}})
    with pytest.raises(BadInputError, match="block-wise QAT with nothing to train"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise", "learn_scales": False}})
    r = Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise"}})
    assert r.method.blockwise and llmq.methods.needs_calibration(r.method)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 48, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rounding_layer_computes_exactly_the_integers_it_converts_to(bits, group_size, symmetric):
    """Against the plain reference: after random rounding offsets and scale changes, the layer's forward weight is
    dequantize(to_qweight()) bit for bit, its codes are round(init codes + offsets) clamped, and the scales'
    gradient is the exact derivative of (q - z) · s (the codes do not follow the scales)."""
    g = torch.Generator().manual_seed(bits * 7 + (group_size or 0))
    scheme = numerics.Scheme(bits=bits, group_size=group_size, symmetric=symmetric)
    linear = torch.nn.Linear(96, 37, bias=True)
    torch.nn.init.normal_(linear.weight, generator=g)
    init = numerics.quantize(linear.weight.data, scheme)
    method = Recipe.from_dict({"model": "m", "method": {"name": "qat", "mode": "blockwise", "block_lr": 0.1}}).method
    layer = RoundingLinear(linear, init, scheme, torch.float16, method)
    with torch.no_grad():
        layer.offsets.copy_(torch.rand(layer.offsets.shape, generator=g) * 3 - 1.5)
        layer.log_scales.copy_(torch.randn(layer.log_scales.shape, generator=g) * 0.1)
    qw = layer.to_qweight()
    expected_codes = torch.clamp(torch.round(init.q.double() + layer.offsets.double()), 0, scheme.maxq)
    assert torch.equal(qw.q.double(), expected_codes)
    assert torch.equal(qw.scales, (init.scales * torch.exp(layer.log_scales)).half().float())
    x = torch.randn(5, 96, generator=g)
    w_ref = numerics.dequantize(qw, scheme)
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, w_ref, linear.bias))
    # d out.sum() / d s[r, j] = Σ_{i in group j} (q - z)[r, i] · Σ_batch x[:, i]; through log space: · s (the
    # unrounded one: the rounding to the stored fp16 passes gradients straight through)
    out.sum().backward()
    z = numerics.zero_values(qw.zeros, qw.scales, scheme)
    gs = scheme.group_size_for(96)
    per_col = (qw.q.double() - z.double().repeat_interleave(gs, 1)) * x.double().sum(0)
    ds = per_col.reshape(37, -1, gs).sum(-1)
    s = (init.scales * torch.exp(layer.log_scales.detach())).double()
    torch.testing.assert_close(layer.log_scales.grad.double(), ds * s, rtol=1e-4, atol=1e-4)


def test_the_walk_trains_each_block_toward_the_full_precision_model(tiny_recipe, tmp_path, monkeypatch):
    """job.targets of every block are the full-precision model's hidden states after that block (not the block's
    output on the quantized stream), and the quantized stream is what the block trains on."""
    from llmq.methods.qat import block_ap
    from llmq.quantization import blockwise

    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, block_epochs=1))
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, block 1 (normed)]
        norm, model.model.norm = model.model.norm, torch.nn.Identity()
        last = model(ids, output_hidden_states=True).hidden_states[-1]
        model.model.norm = norm
    seen = []
    real = block_ap.qat_block

    def spy(block, names, job, init):
        seen.append(([t.clone() for t in job.targets], [h.clone() for h in job.inputs.hidden]))
        return real(block, names, job, init)

    monkeypatch.setattr(blockwise, "block_method", lambda m: llmq.methods.Method(
        lambda b, n, j: spy(b, n, j, llmq.methods.METHODS["rtn"].quantize_block), True, True))
    blockwise.quantize_model(model, recipe, torch.float32, ids)
    assert len(seen) == 2
    torch.testing.assert_close(torch.cat(seen[0][0]), states[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(seen[1][0]), last, rtol=0, atol=1e-5)
    assert not torch.allclose(torch.cat(seen[1][1]), states[1], atol=1e-6)  # block 1 trains on the quantized stream


def test_a_time_budget_is_planned_so_the_rest_of_the_walk_fits():
    import time

    budget = StepBudget(seconds=100.0, n_blocks=10, started=time.perf_counter() - 10.0)
    steps = budget.plan(blocks_left=10, init_s=1.0, eval_s=0.5, step_s=0.2)
    # left 100 * 0.97 - 10 = 87; fixed: its advance 0.5 + 9 later blocks * (3 * 0.5 + 1) = 23; (87 - 23) / (10 * 0.2)
    # = 32 (31 if the clock moved)
    assert steps in (31, 32) and budget.steps == steps
    assert StepBudget(5.0, 10, time.perf_counter() - 10.0).plan(10, 1.0, 0.5, 0.2) == 0  # over budget: no training


def test_after_a_block_trains_the_rest_is_re_planned_from_what_its_steps_took():
    import time

    budget = StepBudget(seconds=100.0, n_blocks=10, started=time.perf_counter() - 40.0, steps=29)
    steps = budget.plan(blocks_left=6, init_s=1.0, eval_s=0.5, step_s=0.4, trained_here=True)
    # left 97 - 40 = 57; fixed: this block's advance 0.5 + 6 later blocks * (3 * 0.5 + 1) = 15.5; 41.5 / (6 * 0.4)
    # = 17.3
    assert steps in (16, 17) and budget.steps == steps  # the steps were slower than planned: fewer from here on
    faster = StepBudget(seconds=100.0, n_blocks=10, started=time.perf_counter() - 40.0, steps=29)
    assert faster.plan(6, 1.0, 0.5, 0.1, trained_here=True) > 29  # faster than planned: more


def test_a_block_given_no_steps_still_re_plans_so_later_blocks_train_again(tiny_recipe, tmp_path):
    """A slow stretch can leave a block no steps; the blocks after it must get steps again once time allows (before,
    only a block that trained re-planned, so one zero plan stopped training for the rest of the walk: seen on
    SmolLM2 W2g32 with a test run on the cores)."""
    import time

    recipe = Recipe.from_dict(_blockwise(tiny_recipe, tmp_path, init="gptq"))
    block, names, job, rows = _first_block_job(recipe)
    job.step_budget = StepBudget(seconds=600.0, n_blocks=4, started=time.perf_counter(), steps=0, step_s=0.05)
    job.blocks_left = 3
    block_method(recipe.method).quantize_block(block, names, job)
    assert rows[-1]["steps"] == 0
    assert job.step_budget.steps > 0 and job.step_budget.step_s == 0.05  # re-planned from the last step time known
    # a plan never made (no step timed yet) is left to the first block that trains
    block, names, job, rows = _first_block_job(recipe)
    job.step_budget, job.blocks_left = StepBudget(seconds=600.0, n_blocks=4, started=time.perf_counter(), steps=0), 3
    block_method(recipe.method).quantize_block(block, names, job)
    assert job.step_budget.steps == 0 and job.step_budget.step_s is None


def test_a_run_with_a_time_budget_re_plans_after_each_block_and_trains_by_the_new_plan(tiny_recipe, tmp_path,
                                                                                      monkeypatch):
    recipe = _blockwise(tiny_recipe, tmp_path, block_minutes=0.2)
    del recipe["method"]["block_epochs"]
    recipe["eval"] = None
    plans, real_plan = [], StepBudget.plan

    def spy(self, blocks_left, init_s, eval_s, step_s, trained_here=False):
        plans.append((blocks_left, trained_here, real_plan(self, blocks_left, init_s, eval_s, step_s, trained_here)))
        return plans[-1][2]

    monkeypatch.setattr(StepBudget, "plan", spy)
    result = llmq.run(recipe)
    steps = {r["block"]: r["steps"] for r in result.report["layers"] if r["method"] == "qat-block"}
    # block 0: planned before training (both blocks to train); after it, block 1 alone, from block 0's real steps
    assert [(b, t) for b, t, _ in plans] == [(2, False), (1, True)]
    assert steps == {"0": plans[0][2], "1": plans[1][2]} and steps["0"] > 0


def test_a_killed_run_with_a_time_budget_resumes_with_the_same_plan(tiny_recipe, tmp_path, monkeypatch):
    from conftest import killed_at_block_1

    from llmq.quantization import resume

    recipe = _blockwise(tiny_recipe, tmp_path)
    del recipe["method"]["block_epochs"]
    # room for block 1 after block 0's re-plan, also on a busy machine (0.4 left block 1 no steps while a 30-minute
    # quantization shared the two cores)
    recipe["method"]["block_minutes"] = 0.8
    recipe["eval"] = None
    with killed_at_block_1(monkeypatch), pytest.raises(RuntimeError, match="killed"):
        llmq.run(recipe)
    work = llmq.io.partial_dir(tmp_path / "out")
    planned = resume.planned_block_steps(work)
    assert planned is not None and planned > 0
    spent = resume.spent_block_seconds(work)  # the killed run's time counts against the resumed run's budget
    assert resume.planned_step_seconds(work) > 0  # and the step time its plan came from (to re-plan after 0 steps)
    assert 0 < spent < 0.8 * 60
    seen = []
    monkeypatch.setattr(StepBudget, "plan", lambda *a, **k: seen.append(a) or 0)  # a resume must not plan again
    resumed = llmq.run(recipe)
    assert resumed.report["quantization"]["resumed_at_block"] == 1 and not seen
    steps = {r["block"]: r["steps"] for r in resumed.report["layers"] if r["method"] == "qat-block"}
    assert steps == {"1": planned}


@pytest.mark.parametrize("recipe_file", ["qat-w4g64.yaml", "qat-w3g64.yaml", "qat-w2g32.yaml"])
def test_the_saved_recipe_of_a_blockwise_run_reads_back_as_the_same_recipe(recipe_file):
    """llmq run saves recipe.yaml from to_dict: keys this mode refuses when given (learn_zero_points, block_epochs
    beside block_minutes) must not be written, and the hash must survive the round trip."""
    r = Recipe.from_yaml(Path(__file__).resolve().parents[2] / "recipes" / recipe_file)
    again = Recipe.from_dict(r.to_dict())
    assert again == r and again.hash() == r.hash() and r.method.block_minutes is not None
