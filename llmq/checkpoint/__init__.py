"""The llmq checkpoint: what a quantized model is on disk and in memory (README, FORMAT).

- `config.py`: `quant_method: "llmq"` (LlmqConfig), the format version, the packed tensor names.
- `quant_linear.py`: QuantLinear, the module holding packed weights and running a kernel; `replace_linears`.
- `hf.py`: transformers' side: registration, the loader's checks, `install_quantized` for in-memory models.
- `safetensors_io.py`: reading checkpoints on demand and writing shards and the index atomically.
"""
