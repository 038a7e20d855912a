"""scheme.embedding: the token embedding stored as packed integers, the tied output projection reading the same
table; exact against numerics.py, saved and reloaded identically, refused when damaged, exported dequantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmq
from llmq import kernels, numerics
from llmq.checkpoint.quant_embedding import QuantEmbedding, TiedQuantHead
from llmq.checkpoint.safetensors_io import weights_bytes
from llmq.errors import BadInputError, LlmqError
from llmq.formats import export_checkpoint, import_checkpoint
from llmq.kernels.dense import exact_dense
from llmq.numerics import Scheme


def _table(vocab: int, dim: int, scheme: Scheme, dtype: torch.dtype, seed: int) -> tuple[QuantEmbedding, torch.Tensor]:
    """A QuantEmbedding of a fresh random table, and the table it stores, dequantized with numerics.py in fp32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=g) * torch.rand(vocab, 1, generator=g)  # rows of different sizes
    qw = numerics.quantize(w, scheme)
    qw = qw._replace(scales=qw.scales.to(dtype).float())  # what is stored is what the codes are read with
    emb = QuantEmbedding(vocab, dim, scheme, dtype)
    emb.load_qweight(qw)
    return emb, numerics.dequantize(qw, scheme)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 48])
@pytest.mark.parametrize("symmetric", [False, True])
def test_lookup_and_tied_projection_match_the_dequantized_table(bits, group_size, symmetric):
    """Odd vocabulary (37 rows: the packed zero points straddle words at 3 bits), every bit width, per-row and grouped:
    the lookup is exactly the dequantized rows; the projection through the reference kernel equals F.linear with the
    dequantized table (fp32, 1e-5 relative), and the CPU kernel stays within its bf16 rounding (2^-7 relative)."""
    scheme = Scheme(bits, group_size, symmetric)
    emb, table = _table(37, 96, scheme, torch.float32, seed=bits * 100 + (group_size or 0) + symmetric)
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor([0, 36, 36, 0])  # the edges, repeated
    assert torch.equal(emb(ids), table[ids])
    x = torch.randn(3, 11, 96, generator=torch.Generator().manual_seed(2))
    want = F.linear(x, table)
    head = TiedQuantHead(emb)
    assert (head.in_features, head.out_features) == (96, 37) and not list(head.state_dict())
    kernels.use(emb, "reference")
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    kernels.use(emb, "cpu")
    assert (head(x) - want).abs().max() <= 2**-7 * want.abs().max()


def test_half_precision_table_reads_in_its_dtype():
    emb, table = _table(50, 64, Scheme(4, 32), torch.float16, seed=3)
    ids = torch.arange(50).reshape(5, 10)
    rows = emb(ids)
    assert rows.dtype == torch.float16 and torch.equal(rows, table.half()[ids])


def _recipe(model: Path, out: Path, method: str = "rtn", embedding="W4g32", calib: Path | None = None, **extra) -> dict:
    r = {"model": str(model), "method": method, "scheme": {"bits": 4, "group_size": 32, "embedding": embedding},
         "eval": None, "output": {"dir": str(out)}, **extra}
    if calib is not None:
        r["calibration"] = {"data": str(calib), "n_samples": 4, "seqlen": 32, "batch_size": 2}
    return r


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory) -> Path:
    from conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("tiny-untied")
    make_tiny_llama(folder, tie=False)
    return folder


@pytest.fixture
def calib(tmp_path) -> Path:
    from conftest import TEXT

    path = tmp_path / "calib.txt"
    path.write_text(TEXT[::-1] * 2)
    return path


@pytest.mark.parametrize("tied, method", [(True, "gptq"), (False, "rtn")])
def test_checkpoint_stores_the_table_once_and_reloads_identically(tiny_model_dir, untied_model_dir, tmp_path, calib,
                                                                   tied, method):
    """llmq run writes the packed table (and no full-precision copy, tied head included), config format 3; the
    reloaded model holds a QuantEmbedding (a TiedQuantHead when tied) and gives the in-memory model's logits exactly.
    The table is the RTN of the base embedding, so the blocks were calibrated on what the quantized model feeds them."""
    base_dir = tiny_model_dir if tied else untied_model_dir
    recipe = _recipe(base_dir, tmp_path / "q", method, calib=calib if method == "gptq" else None)
    result = llmq.run(recipe)
    out = result.output_dir
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3
    assert qc["embedding"] == {"name": "model.embed_tokens", "bits": 4, "group_size": 32, "sym": False,
                               "tied_head": "lm_head" if tied else None}
    keys = {k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    assert {"model.embed_tokens.qweight", "model.embed_tokens.scales", "model.embed_tokens.qzeros"} <= keys
    assert "model.embed_tokens.weight" not in keys and ("lm_head.weight" in keys) != tied
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded.model.embed_tokens, QuantEmbedding)
    assert isinstance(reloaded.lm_head, TiedQuantHead if tied else torch.nn.Linear)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    want = numerics.dequantize(numerics.quantize(base.model.embed_tokens.weight.detach(), Scheme(4, 32)), Scheme(4, 32))
    ids = torch.arange(base.config.vocab_size)
    assert torch.equal(reloaded.model.embed_tokens(ids), want)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    calibration = None
    if method == "gptq":  # the windows llmq run drew
        from llmq.calibration import calibration_batches
        from llmq.loading import load_tokenizer
        calibration = calibration_batches(result.recipe.calibration, load_tokenizer(base_dir))
    llmq.quantize(model, result.recipe, calibration=calibration)
    x = torch.randint(0, reloaded.config.vocab_size, (2, 13))
    with torch.no_grad(), exact_dense(reloaded), exact_dense(model):
        assert torch.equal(reloaded(x).logits, model(x).logits)
        out_ids = reloaded.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 8)

    plain = llmq.run(_recipe(base_dir, tmp_path / "plain", method, embedding=None, calib=calib if method == "gptq" else None))
    table_bytes = base.model.embed_tokens.weight.numel() * 4
    assert weights_bytes(plain.output_dir) - weights_bytes(out) > 0.8 * table_bytes  # 4-bit codes + fp32 scales
    card = (out / "README.md").read_text()
    assert "token embedding is stored W4g32" in card


def test_killed_run_resumes_to_the_same_bytes(tiny_model_dir, tmp_path, monkeypatch, calib):
    from conftest import killed_at_block_1

    recipe = _recipe(tiny_model_dir, tmp_path / "q", "gptq", calib=calib)
    with killed_at_block_1(monkeypatch), pytest.raises(RuntimeError, match="killed"):
        llmq.run(recipe)
    resumed = llmq.run(recipe)
    assert resumed.report["quantization"]["resumed_at_block"] == 1
    fresh = llmq.run(recipe, output_dir=tmp_path / "fresh")
    assert fresh.report["quantization"]["embedding"] == {"name": "model.embed_tokens", "tied_head": "lm_head",
                                                         "scheme": "W4g32 asym"}
    for f in sorted(resumed.output_dir.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "fresh" / f.name).read_bytes(), f.name


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "q"
    llmq.run({"model": str(tiny_model_dir), "method": "rtn", "eval": None, "output": {"dir": str(out), "dtype": "float16"},
              "scheme": {"bits": 4, "group_size": 32, "symmetric": True, "embedding": "W8-sym"}})
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_checkpoints_are_refused(quantized, tmp_path):
    lost = _copy(quantized, tmp_path / "lost")
    shard = next(f for f in sorted(lost.glob("*.safetensors")) if "model.embed_tokens.qweight" in safe_open(f, "pt").keys())
    tensors = load_file(shard)
    del tensors["model.embed_tokens.qzeros"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LlmqError, match="lacks model.embed_tokens.qzeros"):
        AutoModelForCausalLM.from_pretrained(lost)

    def edited(name: str, change) -> Path:
        folder = _copy(quantized, tmp_path / name)
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg["quantization_config"])
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    with pytest.raises(LlmqError, match="this model's token embedding is model.embed_tokens"):
        AutoModelForCausalLM.from_pretrained(edited("foreign", lambda qc: qc["embedding"].update(name="model.norm")))
    with pytest.raises(LlmqError, match="a quantized embedding needs format_version 3"):
        AutoModelForCausalLM.from_pretrained(edited("old", lambda qc: qc.update(format_version=2)))
    with pytest.raises(LlmqError, match="has quantized layer model.embed_tokens that its config does not target"):
        AutoModelForCausalLM.from_pretrained(edited("dropped", lambda qc: qc.pop("embedding")))


@pytest.mark.parametrize("recipe, message", [
    ({"scheme": {"embedding": "W7"}}, "scheme.embedding 'W7' is neither a short name"),
    ({"scheme": {"embedding": {"bits": 4, "group_size": 0}}}, "must be a positive integer"),
    ({"scheme": {"embedding": {"bits": 4, "groups": 32}}}, "groups"),
    ({"scheme": {"embedding": "NF4"}}, "not a preset"),
    ({"scheme": {"format": "nf4", "embedding": "W8"}, "method": "gptq"}, "keeps the embedding in full precision"),
    ({"scheme": {"embedding": "W8"}, "method": "qat"}, "whole-model QAT trains the embedding"),
])
def test_bad_embedding_keys_fail_by_name(recipe, message):
    with pytest.raises(BadInputError, match=message):
        llmq.Recipe.from_dict({"model": "m", **recipe})


def test_group_size_must_divide_the_embedding_width(tiny_model_dir):
    with pytest.raises(BadInputError, match="scheme.embedding.group_size: 48 does not divide the embedding width 64"):
        llmq.validate({"model": str(tiny_model_dir), "eval": None, "scheme": {"group_size": 32, "embedding": "W4g48"}})


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_exports_write_the_table_dequantized_and_say_so(quantized, tmp_path, fmt):
    """GPTQ and compressed-tensors have no quantized embedding: the export holds the dequantized table in the
    checkpoint's dtype (fp16 here: each value rounded to fp16, relative 2^-11), says so, and imports back to the
    same logits up to that rounding."""
    done = export_checkpoint(quantized, tmp_path / "e", fmt)
    assert any("has no quantized embedding" in n and "W8 per-channel sym" in n for n in done.notes), done.notes
    keys = {k for f in (tmp_path / "e").glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    assert "model.embed_tokens.weight" in keys and not [k for k in keys if k.startswith("model.embed_tokens.") and k != "model.embed_tokens.weight"]
    import_checkpoint(tmp_path / "e", tmp_path / "back")
    x = torch.randint(0, 300, (1, 9))
    ours, back = llmq.load(quantized, dtype=torch.float32), llmq.load(tmp_path / "back", dtype=torch.float32)
    with torch.no_grad(), exact_dense(ours), exact_dense(back):
        want = ours(x).logits
        assert (back(x).logits - want).abs().max() <= 2**-9 * want.abs().max()


def test_gguf_maps_an_8_bit_symmetric_table_onto_q8_0(quantized, tmp_path):
    """W8-sym per row with fp16 scales is Q8_0 exactly (blocks of 32 sharing the row's scale): transformers' GGUF
    reader holds llmq's table bit for bit and gives llmq's logits up to fp32 summation order; llama.cpp then uses
    token_embd as its output matrix (tied)."""
    done = export_checkpoint(quantized, tmp_path / "m.gguf", "gguf", embeddings="f32")
    assert done.format.startswith("gguf") and "Q8_0: 1" in done.format and not [n for n in done.notes if "dequantized" in n]
    x = torch.randint(0, 300, (1, 9))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = llmq.load(quantized, dtype=torch.float32)
    with torch.no_grad(), exact_dense(ours):
        ids = torch.arange(300)
        assert torch.equal(theirs.model.embed_tokens(ids), ours.model.embed_tokens(ids))
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-5, atol=1e-6)


def _budget(model: Path, out: Path, calib: Path, size_mb: float) -> dict:
    return {"model": str(model), "method": "gptq", "eval": None, "output": {"dir": str(out)},
            "calibration": {"data": str(calib), "n_samples": 4, "seqlen": 32, "batch_size": 2},
            "scheme": {"bits": 3, "group_size": 32, "budget": {
                "size_mb": size_mb, "candidates": ["W2g32", "W3g32", "W4g32", "W8"], "embedding": ["none", "W8", "W4g32"]}}}


def test_a_size_budget_chooses_the_embeddings_scheme_too(tiny_model_dir, tmp_path, calib, monkeypatch):
    """With budget.embedding the table is one more choice of the solver: scored in the layers' unit (none scores 0,
    coarser scores more), sized exactly; a tight budget quantizes it, a budget with room for everything keeps it in
    full precision; the files fit the budget and the resolved recipe names the choice."""
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    tight = llmq.run(_budget(tiny_model_dir, tmp_path / "tight", calib, 0.12))
    record = tight.report["quantization"]["budget"]
    cands = record["embedding"]["candidates"]
    assert list(cands) == ["none (full precision)", "W8", "W4g32"]
    assert cands["none (full precision)"]["score"] == 0 < cands["W8"]["score"] < cands["W4g32"]["score"]
    assert cands["none (full precision)"]["bits"] == 300 * 64 * 32 > cands["W8"]["bits"] > cands["W4g32"]["bits"]
    assert record["embedding"]["chosen"] != "none (full precision)"
    assert weights_bytes(tight.output_dir) <= record["used_bits"] / 8 <= 0.12 * 1e6
    saved = llmq.Recipe.from_yaml(tight.output_dir / "recipe.yaml")
    assert saved.scheme.budget is None and saved.scheme.embedding.to_scheme().bits == int(record["embedding"]["chosen"][1])
    qc = json.loads((tight.output_dir / "config.json").read_text())["quantization_config"]
    assert qc["embedding"]["bits"] == saved.scheme.embedding.bits
    assert "chose the token embedding's scheme too" in (tight.output_dir / "README.md").read_text()

    roomy = llmq.run(_budget(tiny_model_dir, tmp_path / "roomy", calib, 1.0))
    assert roomy.report["quantization"]["budget"]["embedding"]["chosen"] == "none (full precision)"
    assert roomy.report["quantization"]["budget"]["sensitivity"]["cached"]  # the table's scores were cached too
    assert "embedding" not in json.loads((roomy.output_dir / "config.json").read_text())["quantization_config"]


def test_embedding_candidates_need_a_size_budget():
    with pytest.raises(BadInputError, match="embedding: bits_per_weight counts the Linear layers only"):
        llmq.Recipe.from_dict({"model": "m", "scheme": {"budget": {"bits_per_weight": 4, "embedding": ["W8"]}}})
    with pytest.raises(BadInputError, match="give one of them"):
        llmq.Recipe.from_dict({"model": "m", "scheme": {"embedding": "W8", "budget": {"size_mb": 9, "embedding": ["W8"]}}})


def test_a_candidate_that_does_not_fit_the_width_is_not_offered(tiny_model_dir, tmp_path, calib, monkeypatch):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    recipe = _budget(tiny_model_dir, tmp_path / "q", calib, 0.12)
    recipe["scheme"]["budget"]["embedding"] = ["none", "W4g48", "W8"]  # 48 does not divide the width 64
    record = llmq.run(recipe).report["quantization"]["budget"]["embedding"]
    assert record["candidates"]["W4g48"] == {"bits": None, "score": None} and record["chosen"] != "W4g48"


def test_an_embedding_that_computes_more_than_a_lookup_is_refused(tiny_model_dir):
    """Gemma-style scaled embeddings (an nn.Embedding subclass multiplying by sqrt(hidden)) would lose the scale."""
    from llmq.model.structure import input_embedding

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert input_embedding(model) == ("model.embed_tokens", "lm_head")
    model.model.embed_tokens = Scaled(300, 64)
    with pytest.raises(BadInputError, match=r"token embedding \(Scaled\) is not a plain nn.Embedding lookup"):
        input_embedding(model)


def test_gguf_writes_a_table_off_its_grids_dequantized_and_says_so(tiny_model_dir, tmp_path):
    """8-bit with zero points has no GGUF block type: token_embd is written dequantized in the --embeddings type,
    with a note, and reads back as llmq's table rounded to that type."""
    out = tmp_path / "q"
    llmq.run({"model": str(tiny_model_dir), "method": "rtn", "eval": None, "output": {"dir": str(out), "dtype": "float16"},
              "scheme": {"bits": 4, "group_size": 32, "symmetric": True, "embedding": "W8"}})
    done = export_checkpoint(out, tmp_path / "m.gguf", "gguf", embeddings="f32")
    assert any(n.startswith("model.embed_tokens: 8-bit with zero points") and "written dequantized as F32" in n
               for n in done.notes), done.notes
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = llmq.load(out, dtype=torch.float32)
    ids = torch.arange(300)
    assert torch.equal(theirs.model.embed_tokens(ids), ours.model.embed_tokens(ids))  # f32: exact


def test_lm_eval_and_tie_weights_work_on_a_quantized_table(quantized):
    """lm-eval's HFLM calls model.tie_weights(), which transformers answers by looking up embed_tokens.weight: the
    model keeps the ties it holds instead, and a task scores."""
    from llmq.evaluation import harness

    model = llmq.load(quantized, dtype=torch.float32)
    model.tie_weights()
    assert isinstance(model.lm_head, TiedQuantHead) and model.lm_head.embedding is model.model.embed_tokens
    from llmq.loading import load_tokenizer

    score = harness.run_task(harness.wrap(model, load_tokenizer(quantized)), "llmq_arc_easy", 0, 4)
    assert score.samples == 4 and 0 <= score.metrics["acc"] <= 1


def test_a_copied_model_keeps_its_own_ties(quantized):
    import copy

    model = llmq.load(quantized, dtype=torch.float32)
    twin = copy.deepcopy(model)
    assert twin.tie_weights.__self__ is twin and twin.lm_head.embedding is twin.model.embed_tokens
    twin.tie_weights()
    with pytest.raises(LlmqError, match="its rows cannot be resized"):
        twin.resize_token_embeddings(400)
