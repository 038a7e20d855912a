"""Quantize on load, the transformers way: from_pretrained(full-precision model, quantization_config=LlmqConfig(...))
quantizes each weight as it is read, and the result is what `llmq run` with the RTN recipe of the same scheme writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmq
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.errors import BadInputError
from llmq.kernels.dense import exact_dense


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2: q/k/v have biases, the head is untied."""
    from conftest import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 32, "symmetric": False},
                                    {"bits": 3, "group_size": None, "symmetric": True},
                                    {"bits": 8, "group_size": 64, "symmetric": False}], ids=["w4g32", "w3-sym", "w8g64"])
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_quantize_on_load_equals_llmq_run_rtn(tiny_model_dir, biased_model_dir, tmp_path, scheme, which):
    base = tiny_model_dir if which == "llama" else biased_model_dir
    config = llmq.LlmqConfig(bits=scheme["bits"], group_size=scheme["group_size"], sym=scheme["symmetric"])
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config).eval()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.qweight.device.type == "cpu" for m in layers)
    model.save_pretrained(tmp_path / "loaded")
    run = llmq.run({"model": str(base), "method": "rtn", "scheme": scheme, "eval": None,
                    "output": {"dir": str(tmp_path / "run")}})
    ours, theirs = _tensors(tmp_path / "loaded"), _tensors(run.output_dir)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    qc = json.loads((tmp_path / "loaded" / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((run.output_dir / "config.json").read_text())["quantization_config"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "loaded").eval()
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad(), exact_dense(model), exact_dense(reloaded):
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_quantize_on_load_refuses_what_it_cannot_do(tiny_model_dir):
    with pytest.raises(BadInputError, match="group_size 48 does not divide in_features 64"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=llmq.LlmqConfig(bits=4, group_size=48))
    with pytest.raises(BadInputError, match="per-layer schemes, embeddings and act order are written by `llmq run`"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=llmq.LlmqConfig(
            bits=4, group_size=32, g_idx=True))
    with pytest.raises(BadInputError, match="lm_head, whose weight is tied to the input embeddings"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=llmq.LlmqConfig(
            bits=4, group_size=32, targets=["Linear"], ignore=[]))  # transformers has not tied it yet: its mapping says
    with pytest.raises(BadInputError, match="select no Linear layer"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=llmq.LlmqConfig(
            bits=4, group_size=32, targets=["nothing"]))
