"""GGUF export (llmq/formats/gguf_export.py) against three readers that are not ours: gguf's own block
dequantizers, transformers' GGUF loader (which also undoes llama.cpp's query / key row order), and llama.cpp
itself through llama-cpp-python (built from source by the test extra)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llmq
from llmq import numerics
from llmq.errors import BadInputError
from llmq.formats import export_checkpoint
from llmq.formats.convert import LayerShape
from llmq.formats.gguf_export import BLOCK, block_type, encode_blocks, export_gguf, rotary_rows
from llmq.kernels.dense import exact_dense
from llmq.numerics import QWeight, Scheme

gguf = pytest.importorskip("gguf")

IDS = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))


def fp16_qweight(n: int, k: int, scheme: Scheme, seed: int) -> QWeight:
    """Random codes with scales on the fp16 grid; symmetric layers hold the implicit zero explicitly, as unpacked
    checkpoints do."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, scheme.maxq + 1, (n, k), generator=gen).to(torch.uint8)
    groups = scheme.n_groups(k)
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * 0.01).half().float()
    if scheme.symmetric:
        zeros = torch.full((n, groups), 1 << (scheme.bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, scheme.maxq + 1, (n, groups), generator=gen).to(torch.int32)
        zeros[0, 0], zeros[-1, -1] = 0, scheme.maxq
    return QWeight(q, scales, zeros)


@pytest.mark.parametrize("bits, symmetric, kind", [(2, True, "Q4_0"), (3, True, "Q4_0"), (4, True, "Q4_0"),
                                                   (2, False, "Q4_1"), (3, False, "Q4_1"), (4, False, "Q4_1"),
                                                   (5, True, "Q5_0"), (5, False, "Q5_1"), (6, True, "Q8_0"),
                                                   (8, True, "Q8_0")])
@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_blocks_dequantize_with_ggufs_own_code_to_llmqs_weights(bits, symmetric, kind, group):
    """Every block type, every group size that is a multiple of 32 (per-channel too), an odd row count: gguf's own
    dequantizer gives llmq's (q - z)·s — bit for bit where the format is exact (Q4_0, Q5_0, Q8_0 with fp16 scales),
    within fp16 rounding of the block minimum for Q4_1 / Q5_1."""
    scheme = Scheme(bits=bits, group_size=group, symmetric=symmetric)
    n, k = 37, 256
    qw = fp16_qweight(n, k, scheme, seed=bits * 10 + (group or 0))
    assert block_type(scheme, qw, LayerShape("x", k, n)) == kind
    data, scale_change, min_change = encode_blocks(qw, scheme, kind)
    qtype = gguf.GGMLQuantizationType[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert block_size == BLOCK and data.shape == (n, k // BLOCK * type_size) and data.dtype == np.uint8
    theirs = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(n, k)).double()
    ours = numerics.dequantize(qw, scheme, dtype=torch.float64)
    assert scale_change == 0.0
    if kind in ("Q4_1", "Q5_1"):
        step = qw.scales.double().repeat_interleave(scheme.group_size_for(k), dim=1)
        assert ((theirs - ours).abs() <= 2.0**-11 * scheme.maxq * step + 1e-12).all()  # half an fp16 ulp of -z·s
        assert min_change <= 2.0**-11 * scheme.maxq
    else:
        assert torch.equal(theirs, ours)


def test_scales_off_the_fp16_grid_are_rounded_and_reported():
    scheme = Scheme(bits=4, group_size=32, symmetric=True)
    qw = fp16_qweight(16, 64, scheme, seed=1)
    qw = qw._replace(scales=qw.scales * (1 + 2.0**-14))  # between two fp16 values
    _, scale_change, _ = encode_blocks(qw, scheme, "Q4_0")
    assert 0 < scale_change <= 2.0**-11


def test_rotary_rows_interleave_each_heads_halves():
    rows = rotary_rows(8, 2)  # two heads of 4: HF's (0, 1 | 2, 3) halves -> llama.cpp's pairs (0, 2, 1, 3)
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert sorted(rotary_rows(576, 9).tolist()) == list(range(576))


@pytest.mark.parametrize("scheme, problem", [
    (Scheme(bits=4, group_size=16), "blocks of 32"),
    (Scheme(bits=8, group_size=None, symmetric=False), "8-bit with zero points"),
    (Scheme(bits=6, group_size=32, symmetric=False), "6-bit with zero points"),
    (Scheme(bits=4, group_size=32, format="nf4"), "nf4"),
])
def test_what_gguf_cannot_hold_is_refused_by_name(scheme, problem):
    qw = fp16_qweight(8, 64, Scheme(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric), seed=2)
    with pytest.raises(BadInputError, match=problem):
        block_type(scheme, qw, LayerShape("model.layers.0.mlp.up_proj", 64, 8))
    act_order = qw._replace(g_idx=torch.randperm(64).to(torch.int32) // 32)
    with pytest.raises(BadInputError, match="g_idx"):
        block_type(Scheme(bits=4, group_size=32), act_order, LayerShape("x", 64, 8))


def _quantized(tiny_model_dir: Path, out: Path, scheme: dict, dtype: str = "float16") -> Path:
    llmq.run({"model": str(tiny_model_dir), "scheme": scheme, "method": "rtn", "eval": None,
              "output": {"dir": str(out), "dtype": dtype}})
    return out


def _llmq_logits(folder: Path) -> torch.Tensor:
    model = llmq.load(folder, dtype=torch.float32)
    with torch.no_grad(), exact_dense(model):
        return model(IDS).logits


def _transformers_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 32, "symmetric": True},
                                    {"bits": 3, "group_size": 64, "symmetric": True},
                                    {"bits": 8, "group_size": None, "symmetric": True}], ids=["q4_0", "w3-q4_0", "q8_0"])
def test_symmetric_export_is_exact_through_transformers_gguf_loader(tiny_model_dir, tmp_path, scheme):
    """A recipe with fp16 scales exports exactly: transformers reads the GGUF (dequantizing with gguf's code and
    undoing the query / key row order) into a model whose logits equal llmq's exact ones, bit for bit."""
    ckpt = _quantized(tiny_model_dir, tmp_path / "q", scheme)
    done = export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf", embeddings="f32")
    assert done.layers == 14 and not [n for n in done.notes if "fp16" in n]
    assert torch.equal(_transformers_logits(tmp_path / "m.gguf"), _llmq_logits(ckpt))


def test_asymmetric_export_and_tokenizer_metadata(tiny_model_dir, tmp_path):
    """Asymmetric W4 g32 -> Q4_1 (close, with the note saying how close); the file carries the tokenizer: the same
    tokens, merges and special ids as the checkpoint's, and the name llama.cpp's pre-tokenizer was given."""
    ckpt = _quantized(tiny_model_dir, tmp_path / "q", {"bits": 4, "group_size": 32, "symmetric": False})
    done = export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f16", tokenizer_pre="gpt-2")
    assert done.types == {"Q4_1": 14, "F32": 5, "F16": 1}
    assert any("Q4_1 stores the block minimum" in n for n in done.notes)
    ours, theirs = _llmq_logits(ckpt), _transformers_logits(tmp_path / "m.gguf")
    assert (ours - theirs).abs().max() <= 0.01 * ours.abs().max()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.", "llama."))}
    tok = llmq.loading.load_tokenizer(ckpt)
    assert fields["tokenizer.ggml.tokens"][:300] == tok.convert_ids_to_tokens(list(range(300)))
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["llama.block_count"] == 2 and fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    assert "token_embd.weight" in {t.name for t in reader.tensors} and "output.weight" not in {t.name for t in reader.tensors}


def test_full_precision_export_and_refusals(tiny_model_dir, tmp_path):
    """A full-precision folder exports as F32 (what llama.cpp's quantizer starts from) and reads back exactly; an
    existing file is kept unless --overwrite; wrong inputs fail before anything is written."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "base.gguf"
    done = export_gguf(tiny_model_dir, out, embeddings="f32")
    assert done.layers == 0 and set(done.types) == {"F32"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(_transformers_logits(out), base(IDS).logits)
    before = out.read_bytes()
    with pytest.raises(BadInputError, match="already exists"):
        export_gguf(tiny_model_dir, out)
    assert out.read_bytes() == before
    with pytest.raises(BadInputError, match=r"name it \*\.gguf"):
        export_gguf(tiny_model_dir, tmp_path / "model.bin")
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, folder)
    cfg = (folder / "config.json").read_text().replace('"LlamaForCausalLM"', '"Qwen2ForCausalLM"').replace('"llama"', '"qwen2"')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(BadInputError, match="Llama-architecture"):
        export_gguf(folder, tmp_path / "q.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".gguf") or ".gguf." in p.name) == ["base.gguf"]


def test_cli_export_gguf_prints_the_types_and_notes(tiny_model_dir, tmp_path, capsys):
    from llmq.cli import main

    ckpt = _quantized(tiny_model_dir, tmp_path / "q", {"bits": 4, "group_size": 32, "symmetric": True}, dtype="float32")
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf", "--embeddings", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "Q4_0: 14" in printed and "Q8_0: 1" in printed
    assert "note: " in printed and "--tokenizer-pre" in printed  # says how to name the model's pre-tokenizer
    assert main(["export", str(ckpt), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2  # exists: refused


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _llama_logits(llama_cpp, path: Path) -> torch.Tensor:
    """llama.cpp's logits for IDS, from its own CPU kernels."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(IDS[0].tolist())
        return torch.tensor(np.asarray(llm.scores[: IDS.shape[1]]), dtype=torch.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 32, "symmetric": True},
                                    {"bits": 4, "group_size": 64, "symmetric": False},
                                    {"bits": 8, "group_size": None, "symmetric": True}], ids=["q4_0", "q4_1", "q8_0"])
def test_llama_cpp_loads_every_export_and_computes_llmqs_logits(llama_cpp, tiny_model_dir, tmp_path, scheme):
    """The oracle: llama.cpp itself loads the file and its logits match llmq's exact ones. Its CPU kernels round the
    activations to 8 bits for these block types, so the match is close, not exact: within 2% of the largest
    logit, same argmax almost everywhere."""
    ckpt = _quantized(tiny_model_dir, tmp_path / "q", scheme)
    export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f32")
    theirs, ours = _llama_logits(llama_cpp, tmp_path / "m.gguf"), _llmq_logits(ckpt)[0]
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_llama_cpp_quantizes_our_full_precision_export(llama_cpp, tiny_model_dir, tmp_path):
    """The F32 export is llama.cpp's starting point: it computes the base's logits (to fp32 rounding), and its own
    quantizer (the peer the benchmarks compare with) turns it into a Q4_0 file it can run."""
    import ctypes

    from transformers import AutoModelForCausalLM

    export_gguf(tiny_model_dir, tmp_path / "base.gguf", embeddings="f32")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = base(IDS).logits[0]
    assert (_llama_logits(llama_cpp, tmp_path / "base.gguf") - ref).abs().max() <= 1e-3 * ref.abs().max()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "base.gguf").encode(), str(tmp_path / "q4_0.gguf").encode(),
                                          ctypes.byref(params)) == 0
    theirs = _llama_logits(llama_cpp, tmp_path / "q4_0.gguf")
    assert theirs.shape == ref.shape and torch.isfinite(theirs).all()
