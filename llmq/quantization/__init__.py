"""Quantizing a model: the block walk (`blockwise.py`, resumable through `resume.py`), QAT's whole-model run
(`qat.py`), the bitsandbytes paths (`bitsandbytes.py`) and the in-memory API (`in_memory.py`, `llmq.quantize`).
The methods' math lives in methods/; this package decides what runs where and writes the result."""
