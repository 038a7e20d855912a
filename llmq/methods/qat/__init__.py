"""QAT's parts: fake-quantized layers and their conversion to exact integers (`fake_quant.py`) and the fine-tune
loop (`training.py`). quantization/qat.py runs the method: initialise, prepare, train, convert."""

from .fake_quant import FakeQuantLinear, convert, fake_quant_layers, init_recipe, prepare

__all__ = ["FakeQuantLinear", "convert", "fake_quant_layers", "init_recipe", "prepare"]
