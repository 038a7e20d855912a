"""QAT's parts: fake-quantized layers and their conversion to exact integers (`fake_quant.py`), whole-model QAT's
fine-tune loop (`training.py`; quantization/qat.py runs that mode: initialise, prepare, train, convert) and
block-wise QAT, a per-block method of the walk (`block_ap.py`)."""

from .fake_quant import FakeQuantLinear, convert, fake_quant_layers, init_recipe, prepare

__all__ = ["FakeQuantLinear", "convert", "fake_quant_layers", "init_recipe", "prepare"]
