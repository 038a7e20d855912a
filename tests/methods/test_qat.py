"""QAT: the learnable fake-quant math against the plain reference, prepare / train / convert, resume, two processes.

Tolerances: fake-quant forwards and converted models are compared with zero tolerance (torch.equal): both compute
(q - z) * s in fp32 from the same integers. The two-process run is compared with one process at the same global
batch within 1e-5 relative on the losses (gradients are averaged in a different order).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import llmq
from llmq import cli, loading, numerics
from llmq.errors import BadInputError, LlmqError
from llmq.kernels.dense import exact_dense
from llmq.methods import qat
from llmq.methods.qat.training import STATE, STATE_KEY, step_windows
from llmq.numerics import Scheme
from llmq.quantization import qat as qat_run
from llmq.recipe import Recipe

SCHEMES = [Scheme(b, g, sym) for b in (2, 3, 4, 8) for g in (None, 16, 32) for sym in (False, True)]


def _qparams(w: torch.Tensor, scheme: Scheme, gen: torch.Generator):
    """Min-max qparams, scales jittered and zero points made non-integer, as after some training."""
    scales, zeros = numerics.minmax_qparams(w, scheme)
    scales = scales * (0.7 + 0.6 * torch.rand(scales.shape, generator=gen))
    zf = None if zeros is None else zeros.float() + torch.rand(zeros.shape, generator=gen) - 0.5
    return scales, zf


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_learnable_fake_quantize_equals_dequantize_of_quantize(scheme):
    gen = torch.Generator().manual_seed(scheme.bits * 100 + (scheme.group_size or 0))
    for out, inp in ((7, 96), (33, 160)):  # odd row counts; columns divisible by every group size
        w = torch.randn(out, inp, generator=gen) * 0.05
        scales, zf = _qparams(w, scheme, gen)
        zi = None if zf is None else torch.clamp(torch.round(zf), 0, scheme.maxq).to(torch.int32)
        ref = numerics.dequantize(numerics.quantize(w, scheme, scales, zi), scheme)
        got = numerics.fake_quantize_learnable(w, scheme, scales, zf)
        assert torch.equal(got, ref)


def test_learnable_fake_quantize_with_g_idx_equals_reference():
    scheme, gen = Scheme(4, 16, False), torch.Generator().manual_seed(3)
    w = torch.randn(9, 64, generator=gen)
    g_idx = torch.randperm(64, generator=gen).to(torch.int32) // 16
    scales = torch.rand(9, 4, generator=gen) * 0.2 + 0.05
    zeros = torch.randint(0, 16, (9, 4), generator=gen).to(torch.int32)
    ref = numerics.dequantize(numerics.quantize(w, scheme, scales, zeros, g_idx), scheme)
    assert torch.equal(numerics.fake_quantize_learnable(w, scheme, scales, zeros.float(), g_idx), ref)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learnable_fake_quantize_gradients_are_lsq(symmetric):
    """With q = clamp(round(w/s) + z, 0, maxq) and ŵ = (q - z)·s, straight-through rounding gives per element:
    dŵ/dw = 1 inside the grid, 0 where clamped; dŵ/ds = (q - z) - w/s inside, (q - z) where clamped (LSQ);
    dŵ/dz = -s where clamped, 0 inside. Per-group parameters collect the sum over their elements."""
    scheme, gen = Scheme(3, None, symmetric), torch.Generator().manual_seed(5)
    w = torch.randn(6, 40, generator=gen)
    scales, zf = numerics.minmax_qparams(w, scheme)
    scales = (scales * 0.6).requires_grad_(True)  # clip some elements
    zeros = None if zf is None else zf.float().requires_grad_(True)
    w = w.requires_grad_(True)
    numerics.fake_quantize_learnable(w, scheme, scales, zeros).sum().backward()
    with torch.no_grad():
        z = numerics.zero_values(None if zeros is None else torch.round(zeros), scales, scheme)
        raw = torch.round(w / scales) + z
        inside = (raw >= 0) & (raw <= scheme.maxq)
        q = raw.clamp(0, scheme.maxq)
        assert inside.any() and (~inside).any()
        assert torch.equal(w.grad, inside.float())
        ds = torch.where(inside, (q - z) - w / scales, q - z).sum(dim=1, keepdim=True)
        torch.testing.assert_close(scales.grad, ds, rtol=1e-5, atol=1e-5)
        if zeros is not None:
            assert torch.equal(zeros.grad, (-scales * (~inside).float()).sum(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------- prepare / convert


def _qat_recipe(model_dir, **training) -> Recipe:
    method = training.pop("method", {"name": "qat", "init": "rtn"})
    scheme = training.pop("scheme", {"bits": 3, "group_size": 16})
    return Recipe.from_dict({
        "model": str(model_dir), "method": method, "scheme": scheme, "eval": None,
        "calibration": {"n_samples": 4, "seqlen": 32},
        "training": {"seqlen": 32, "batch_size": 4, "micro_batch_size": 2, "budget": {"steps": 3}, "lr": 1e-3,
                     "qparam_lr": 1e-3, **training},
    })


def _windows(vocab: int, n: int = 12, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_prepared_model_starts_exactly_at_its_ptq_model(tiny_model_dir, init):
    recipe = _qat_recipe(tiny_model_dir, method={"name": "qat", "init": init})
    ids = _windows(300, 2)
    ptq = loading.load_model(tiny_model_dir, dtype=torch.float32)
    llmq.quantize(ptq, qat.init_recipe(recipe), calibration=ids)
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    from llmq.quantization import blockwise

    qweights, _ = blockwise.quantize_model(model, qat.init_recipe(recipe), torch.float32, ids)
    qat.prepare(model, qweights, recipe.scheme.to_scheme(), torch.float32, recipe.method)
    assert len(qat.fake_quant_layers(model)) == 14
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ptq(input_ids=ids).logits)
    # and converting right away gives back the PTQ integers
    for name, qw in qat.convert(model).items():
        assert torch.equal(qw.q, qweights[name].q)


@pytest.mark.parametrize("scheme", [{"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 16},
                                    {"bits": 4, "group_size": None, "symmetric": True}, {"bits": 8, "group_size": 64}])
def test_converted_model_equals_trained_fake_quant_model_exactly(tiny_model_dir, tmp_path, scheme):
    recipe = _qat_recipe(tiny_model_dir, scheme=scheme, loss="next_token")
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    ids = _windows(model.config.vocab_size, 3, seed=7)
    done = qat_run.quantize_model(model, recipe, torch.float32, _windows(model.config.vocab_size))
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    changed = sum(not torch.equal(done.qweights[n].scales, s) for n, s in _rtn_scales(tiny_model_dir, recipe).items())
    assert changed > 0  # training moved the scales: the comparison below is not of an untrained model
    llmq.checkpoint.hf.install_quantized(model, recipe.scheme.to_scheme(), done.qweights, torch.float32, recipe.targets, recipe.ignore)
    with torch.no_grad(), exact_dense(model):  # llmq's exact fp32 kernel, as its evaluations run
        assert torch.equal(model(input_ids=ids).logits, fake)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = llmq.load(tmp_path / "ckpt")
    with torch.no_grad(), exact_dense(reloaded):
        assert torch.equal(reloaded(input_ids=ids).logits, fake)


def _rtn_scales(model_dir, recipe) -> dict[str, torch.Tensor]:
    from llmq.quantization import blockwise

    model = loading.load_model(model_dir, dtype=torch.float32)
    qweights, _ = blockwise.quantize_model(model, qat.init_recipe(recipe), torch.float32)
    return {n: qw.scales for n, qw in qweights.items()}


def test_training_lowers_the_distillation_loss(tiny_model_dir):
    recipe = _qat_recipe(tiny_model_dir, scheme={"bits": 2, "group_size": 16}, budget={"steps": 12}, lr=1e-3,
                         qparam_lr=1e-3, batch_size=4, micro_batch_size=4, warmup=0.0)
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    windows = _windows(model.config.vocab_size, n=4)  # one batch, seen every step: the loss must fall
    done = qat_run.quantize_model(model, recipe, torch.float32, windows)
    losses = done.train.losses
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses


def test_frozen_weights_train_only_qparams(tiny_model_dir):
    recipe = _qat_recipe(tiny_model_dir, method={"name": "qat", "train_weights": False})
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qat_run.quantize_model(model, recipe, torch.float32, _windows(model.config.vocab_size))
    layers = qat.fake_quant_layers(model)
    assert all(torch.equal(layers[n].weight, before[n]) for n in layers)
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # untargeted layers never train


def test_step_windows_cover_every_window_once_per_epoch():
    seen = [i for step in range(6) for i in step_windows(step, 12, 4, seed=3)]
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))
    assert seen[:12] != seen[12:]  # a fresh order each epoch
    assert step_windows(4, 12, 4, seed=3) == step_windows(4, 12, 4, seed=3)


def test_budget_in_tokens_rounds_up_to_whole_steps(tiny_model_dir):
    recipe = _qat_recipe(tiny_model_dir, budget={"tokens": 300})  # 4 windows x 32 tokens = 128 per step
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    assert qat_run.quantize_model(model, recipe, torch.float32, _windows(300)).train.steps == 3


def test_budget_in_minutes_times_a_step_and_fits_the_time(tiny_model_dir):
    recipe = _qat_recipe(tiny_model_dir, budget={"minutes": 0.05})  # 3 s for init and training
    model = loading.load_model(tiny_model_dir, dtype=torch.float32)
    done = qat_run.quantize_model(model, recipe, torch.float32, _windows(300))
    # what the budget governs (init + training, as timed by the loop itself, not the conversion after it) fits the
    # 3 s: the step count is planned from the faster of two timed steps, so allow 50% for steps that run slower than
    # that (measured: 259 planned steps took 3.65 s on an idle machine) plus two steps
    step = done.train.seconds / done.train.steps
    assert done.train.steps >= 1 and done.init_seconds + done.train.seconds < 3.0 * 1.5 + 2 * step


# ------------------------------------------------------------------------------------------------ resume


def test_resume_continues_to_the_same_result(tiny_model_dir, tmp_path):
    recipe = _qat_recipe(tiny_model_dir, budget={"steps": 5}, checkpoint_every=2)
    windows = _windows(300)

    def run(state_path, stop_after=None):
        model = loading.load_model(tiny_model_dir, dtype=torch.float32)
        return qat_run.quantize_model(model, recipe, torch.float32, windows, key="k", state_path=state_path, stop_after=stop_after)

    whole = run(None)
    state = tmp_path / STATE
    with pytest.raises(LlmqError, match="stopped after step 3"):
        run(state, stop_after=3)  # "killed" after step 3: the last checkpoint is at step 2
    assert torch.load(state, weights_only=False)["step"] == 2
    resumed = run(state)
    assert resumed.train.resumed_at_step == 2
    assert resumed.train.losses == whole.train.losses
    for name, qw in whole.qweights.items():
        got = resumed.qweights[name]
        assert torch.equal(got.q, qw.q) and torch.equal(got.scales, qw.scales) and torch.equal(got.zeros, qw.zeros)
    with pytest.raises(LlmqError, match="different recipe"):
        qat_run.quantize_model(loading.load_model(tiny_model_dir, dtype=torch.float32), recipe, torch.float32, windows,
                           key="other", state_path=state)


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs starts gloo CPU processes (torchrun underneath)."""
    worker = Path(__file__).with_name("qat_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(worker), str(tiny_model_dir), str(one), "4"], check=True, env=env,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    res = subprocess.run([*launch, str(worker), str(tiny_model_dir), str(two), "4"], env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert (a["processes"], b["processes"]) == (1, 2)
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=0)
    differ = sum((a["weights"][n] != b["weights"][n]).sum().item() for n in a["weights"])
    total = sum(w.numel() for w in a["weights"].values())
    assert differ <= total * 1e-3  # a rounding tie may fall the other way; nothing more


def test_llmq_run_under_accelerate_launch_trains_on_two_processes_and_writes_once(tiny_recipe, tmp_path):
    recipe = {**tiny_recipe, "method": {"name": "qat", "init": "rtn"}, "scheme": {"bits": 3, "group_size": 32},
              "training": {"data": tiny_recipe["eval"]["data"] + ".train.txt", "seqlen": 32, "batch_size": 4,
                           "micro_batch_size": 2, "budget": 2}}
    Path(recipe["training"]["data"]).write_text(Path(tiny_recipe["eval"]["data"]).read_text()[::-1])
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    res = subprocess.run([*launch, "-m", "llmq.cli", "run", str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done: ") == 1  # only the main process evaluates and writes
    report = yaml.safe_load((Path(recipe["output"]["dir"]) / "report.json").read_text())
    assert report["quantization"]["qat"]["training"]["processes"] == 2


# --------------------------------------------------------------------------------------------- llmq run


def test_llmq_run_qat_end_to_end(tiny_recipe, tiny_corpus, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text(tiny_corpus.read_text()[::-1])
    recipe = {**tiny_recipe, "method": {"name": "qat", "init": "rtn"}, "scheme": {"bits": 3, "group_size": 32},
              "training": {"data": str(train), "seqlen": 32, "batch_size": 4, "micro_batch_size": 2, "budget": 3}}
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["run", str(path), "--resume"]) == 2  # nothing to resume
    result = llmq.run(path)
    report = result.report
    assert set(report["metrics"]) >= {"base", "init", "quantized", "qat_recovery"}
    assert report["quantization"]["qat"]["training"]["steps"] == 3
    assert len(report["quantization"]["qat"]["training"]["losses"]) == 3
    card = (result.output_dir / "README.md").read_text()
    assert "## Quantization-aware training" in card and "init (rtn, before QAT)" in card
    assert not (result.output_dir / STATE).exists() and not (result.output_dir / STATE_KEY).exists()
    model = llmq.load(result.output_dir)
    assert isinstance(model.model.layers[0].mlp.down_proj, llmq.checkpoint.quant_linear.QuantLinear)


def test_recipe_rejects_qat_keys_elsewhere_and_training_on_eval_text():
    with pytest.raises(BadInputError, match="training applies to method qat only"):
        Recipe.from_dict({"model": "m", "method": "gptq", "training": {"budget": 10}})
    with pytest.raises(BadInputError, match="learn_scales applies to method qat only"):
        Recipe.from_dict({"model": "m", "method": {"name": "rtn", "learn_scales": False}})
    with pytest.raises(BadInputError, match="damp applies to method gptq"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "damp": 0.1}})
    assert Recipe.from_dict({"model": "m", "method": {"name": "qat", "init": "gptq", "damp": 0.1}}).method.damp == 0.1
    with pytest.raises(BadInputError, match="never train on the evaluation text"):
        Recipe.from_dict({"model": "m", "method": "qat", "training": {"data": "wiki"}})
    with pytest.raises(BadInputError, match="exactly one of steps, tokens or minutes"):
        Recipe.from_dict({"model": "m", "method": "qat", "training": {"budget": {"steps": 3, "minutes": 1}}})
    with pytest.raises(BadInputError, match="nothing to train"):
        Recipe.from_dict({"model": "m", "method": {"name": "qat", "train_weights": False, "learn_scales": False,
                                                   "learn_zero_points": False}})
    assert Recipe.from_dict({"model": "m", "method": "qat"}).training.budget.steps == 100
