"""Evaluation: the perplexity protocol (`perplexity.py`), lm-eval tasks run offline (`harness.py`, `tasks/`),
suites of them (`suite.py`, YAMLs in `suites/`), a suite on one checkpoint (`suite_run.py`) with its results kept
in the store (`store.py`), and the regression gate (`gate.py`). Kept import-free so that a lower layer (the
model card's recovery column) can use `scores.py` without loading lm-eval."""
