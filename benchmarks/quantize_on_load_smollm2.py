"""Quantize on load on SmolLM2-135M: peak memory of `from_pretrained(..., quantization_config=LlmqConfig(...))` next to
a plain full-precision load, each in a fresh process, and the seconds each takes. Writes <out>.json and <out>.md.

    python benchmarks/quantize_on_load_smollm2.py [--out benchmarks/results/quantize_on_load_smollm2]

Peak memory: the process's peak resident set (ru_maxrss), which counts the pages of the memory-mapped checkpoint file
it has read (clean, file-backed, reclaimable), and the peak of its anonymous memory (RssAnon, sampled every 5 ms):
what the process itself allocated, both above the level after imports. The checkpoint is fp32 safetensors (538 MB).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CHILD = r"""
import json, resource, sys, time
import torch
import llmq
from transformers import AutoModelForCausalLM
from llmq.model.resolve import resolve
import threading
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e3
def rss_mb():
    return status_mb("VmRSS")
peak_anon = [0.0]
def watch():
    while True:
        peak_anon[0] = max(peak_anon[0], status_mb("RssAnon"))
        time.sleep(0.005)
folder = resolve("smollm2-135m")
before, anon_before = rss_mb(), status_mb("RssAnon")
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
kw = {} if sys.argv[1] == "fp32" else {"quantization_config": llmq.LlmqConfig(bits=4, group_size=64)}
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
seconds = time.perf_counter() - t
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
print(json.dumps({"load": sys.argv[1], "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
                  "rss_before_mb": round(before, 1), "peak_above_imports_mb": round(peak - before, 1),
                  "peak_anon_above_imports_mb": round(max(peak_anon[0], status_mb("RssAnon")) - anon_before, 1),
                  "model_tensors_mb": round(held, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "quantize_on_load_smollm2"))
    args = ap.parse_args()
    rows = []
    for load in ("fp32", "w4g64-on-load"):
        done = subprocess.run([sys.executable, "-c", CHILD, load], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Quantize on load, SmolLM2-135M (fp32 safetensors, 2-core CPU)", "",
             "`python benchmarks/quantize_on_load_smollm2.py`: each load in a fresh process; peak = ru_maxrss.", "",
             "| load | seconds | peak RSS above imports MB (file pages included) | peak anonymous memory above imports MB | "
             "model tensors MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['seconds']} | {r['peak_above_imports_mb']} | {r['peak_anon_above_imports_mb']} | "
              f"{r['model_tensors_mb']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
