"""A QAT run on a saved tiny model, for tests that launch it as one process or under `accelerate launch`.

    python qat_worker.py MODEL_DIR OUT.pt [--steps N]
    accelerate launch --multi_gpu --num_processes 2 qat_worker.py MODEL_DIR OUT.pt   (gloo CPU processes without GPUs)

Trains from RTN with a fixed recipe (global batch 4 windows, micro-batches of 2) on random token windows and, on
the main process, saves the converted QWeights' dequantized weights and the per-step losses to OUT.pt.
"""

import sys

import torch

from llmq import loading, numerics
from llmq.quantization import qat as qat_run
from llmq.recipe import Recipe


def main(model_dir: str, out: str, steps: int = 4) -> None:
    torch.manual_seed(0)
    model = loading.load_model(model_dir, dtype=torch.float32)
    windows = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.from_dict({
        "model": model_dir, "method": {"name": "qat", "init": "rtn"}, "scheme": {"bits": 3, "group_size": 16},
        "training": {"seqlen": 32, "batch_size": 4, "micro_batch_size": 2, "budget": {"steps": steps},
                     "lr": 1e-3, "qparam_lr": 1e-3, "max_grad_norm": None},
        "eval": None,
    })
    done = qat_run.quantize_model(model, recipe, torch.float32, windows)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        scheme = recipe.scheme.to_scheme()
        weights = {n: numerics.dequantize(qw, scheme) for n, qw in done.qweights.items()}
        torch.save({"weights": weights, "losses": done.train.losses, "processes": done.train.processes}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4)
