"""The `llmq` command: a thin layer over the Python API that turns failures into one-line messages.

Exit codes: 0 ok, 2 bad input (recipe, model or data spec, existing output), 3 a recipe's regression gate
failed (eval.thresholds), 1 any other failure, 130 interrupted. Set LLMQ_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from .environment import DTYPES
from .errors import BadInputError, LlmqError
from .formats import EXPORT_FORMATS, gguf_export
from .numerics import SUPPORTED_BITS

STORE_HELP = "results store file (default: $LLMQ_RESULTS, else results.jsonl in $LLMQ_CACHE, default ~/.cache/llmq)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmq",
        description="Quantize Hugging Face causal LMs and measure what it cost.",
        epilog="Examples: llmq run recipes/quickstart.yaml; llmq export out/quickstart out/qs-gptq --format gptq",
    )
    from .version import __version__

    p.add_argument("--version", action="version", version=f"llmq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_validate, _add_export, _add_import, _add_eval, _add_leaderboard, _add_bench, _add_inspect):
        add(sub)
    return p


def _add_output_args(command) -> None:
    command.add_argument("output", help="the folder to write")
    command.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def _add_timing_args(command) -> None:
    command.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians). Default: 5")
    command.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    command.add_argument("--json", help="also write the results to this JSON file")


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="quantize, save, reload and evaluate as a recipe says",
                         description="Run a recipe end to end: quantize, save safetensors, reload with from_pretrained, "
                                     "evaluate base and quantized perplexity, write report.json and a model card.")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("-o", "--output", help="output folder (default: the recipe's output.dir, else out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run (an error if there is none); a rerun of the same recipe "
                          "resumes by itself anyway, PTQ at the next block, QAT at its last training checkpoint")


def _add_validate(sub) -> None:
    val = sub.add_parser("validate", help="check a recipe without running it",
                         description="Validate a recipe: keys, types, values, and (unless --no-model) that its scheme "
                                     "fits the model's layers. Reads no weights.")
    val.add_argument("recipe", help="path to a recipe YAML file")
    val.add_argument("--no-model", action="store_true", help="check the recipe alone, without resolving the model")


def _add_export(sub) -> None:
    exp = sub.add_parser("export", help="write an llmq checkpoint as GPTQ, compressed-tensors or GGUF",
                         description="Rewrite an llmq checkpoint in a format that vLLM, SGLang, transformers or llama.cpp "
                                     "serve. The integer codes are kept exactly; only the packing changes (GGUF: scales "
                                     "in fp16, see the notes it prints).",
                         epilog="Examples: llmq export out/gptq-w4g64 out/gptq-w4g64-vllm --format gptq\n"
                                "          llmq export out/gptq-w4g32-sym out/model.gguf --format gguf --tokenizer-pre smollm",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("checkpoint", help="an llmq checkpoint folder (the output of llmq run); for gguf also a full-precision one")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                     help="gptq: quant_method gptq (transformers via optimum + gptqmodel, vLLM, SGLang); "
                          "compressed-tensors: pack-quantized (vLLM, SGLang, compressed-tensors); "
                          "gguf: one .gguf file for llama.cpp (Llama models; Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 "
                          "blocks, and Q2_K-Q6_K for layers made with method.gguf_grid)")
    exp.add_argument("--gptq-version", type=int, choices=[1, 2], default=1,
                     help="GPTQ zero-point convention: 1 stores zero - 1 (what most servers read; cannot store a zero "
                          "point of 0), 2 stores the true zero (GPTQModel). Default: 1")
    exp.add_argument("--embeddings", choices=gguf_export.EMBEDDING_TYPES, default="f16",
                     help="gguf: type of the full-precision matrices (token embeddings, an untied lm_head). Default: f16")
    exp.add_argument("--tokenizer-pre",
                     help="gguf: llama.cpp's name for the model's pre-tokenizer (e.g. smollm, llama-bpe). Default: default")
    exp.add_argument("output", help="the folder to write (gguf: the .gguf file)")
    exp.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _add_import(sub) -> None:
    imp = sub.add_parser("import", help="bring a GPTQ or compressed-tensors checkpoint into llmq",
                         description="Rewrite a GPTQ (v1 or v2) or compressed-tensors pack-quantized checkpoint as an llmq "
                                     "checkpoint, so llmq's QuantLinear kernels and evaluation run on it. Exact: the same "
                                     "integer codes, scales and zero points.",
                         epilog="Example: llmq import ./Llama-3-8B-GPTQ out/llama3-gptq-llmq")
    imp.add_argument("checkpoint", help="a local GPTQ or compressed-tensors checkpoint folder")
    _add_output_args(imp)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="score any causal LM checkpoint on an evaluation suite (lm-eval, offline)",
                        description="Evaluate a checkpoint (full precision, llmq, GPTQ, compressed-tensors or bitsandbytes; "
                                    "a folder, built-in alias or hub id) on a suite of lm-eval tasks and the perplexity "
                                    "protocol. Each result is kept in the results store, keyed by the checkpoint's content "
                                    "hash, suite, task, shots, limit, llmq and lm-eval versions and process count; a rerun "
                                    "is served from it. Runs data-parallel under `accelerate launch`.",
                        epilog="Examples: llmq eval smollm2-135m --suite quick; llmq eval out/gptq-w4g64 --suite leaderboard "
                               "--limit 50 (stored as suite leaderboard-limit50); llmq eval out/w4 --tasks arc_easy,boolq "
                               "--num-fewshot 5 --limit 0.1 --output-path out/w4-evals --log-samples; "
                               "accelerate launch --multi_gpu --num_processes 2 -m llmq.cli eval out/w4 --suite quick")
    ev.add_argument("checkpoint", help="a checkpoint folder, a built-in alias (smollm2-135m) or a hub id (online only)")
    ev.add_argument("--suite",
                    help="a suite name (llmq/evaluation/suites: quick, leaderboard, leaderboard-cpu) or a suite .yaml "
                         "file. Default: quick")
    ev.add_argument("--tasks", help="comma-separated tasks instead of a suite, as lm-eval takes them: labels of the "
                                    "offline task folder (arc_easy, boolq, hellaswag, ...) or lm-eval task names; a task "
                                    "a packaged suite defines keeps its shots and metric, others are scored by acc")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples for every task, replacing the suite's")
    ev.add_argument("--limit", type=_limit,
                    help="documents per task (per subject for MMLU), or a fraction of them below 1 (0.1), replacing the "
                         "suite's limits")
    ev.add_argument("--apply-chat-template", action="store_true",
                    help="prompts through the tokenizer's chat template (instruct models), stored as its own suite (-chat)")
    ev.add_argument("--output-path", help="also write the results as JSON: a .json file (refused if it exists), or a "
                                          "folder (a new results_<time>.json in it)")
    ev.add_argument("--log-samples", action="store_true",
                    help="with --output-path: evaluate every task afresh and write lm-eval's per-document records, one "
                         "samples_<task>_<time>.jsonl per task beside the results")
    ev.add_argument("--word-perplexity", action="store_true",
                    help="also run lm-eval's word perplexity on the wiki articles (task llmq_wikitext; not the protocol's perplexity)")
    ev.add_argument("--store", help=STORE_HELP)
    ev.add_argument("--name", help="the row's name in tables (default: the folder name or alias)")
    ev.add_argument("--base", help="the base model this checkpoint was made from, for recovery (llmq checkpoints know it)")
    ev.add_argument("--batch-size", type=int, help="lm-eval batch size (default: chosen automatically)")


def _add_leaderboard(sub) -> None:
    lb = sub.add_parser("leaderboard", help="build the leaderboard (Markdown, HTML, plots) from the results store",
                        description="Draw one table, one sortable HTML page and two plots (wiki perplexity vs weight bits, "
                                    "average accuracy vs size on disk with the Pareto front) from the results of one suite.",
                        epilog="Example: llmq leaderboard --store benchmarks/results/store.jsonl --suite quick --out benchmarks/leaderboard")
    lb.add_argument("--suite", default="quick", help="which suite's results to draw. Default: quick")
    lb.add_argument("--store", help=STORE_HELP)
    lb.add_argument("--out", default="leaderboard", help="output folder (leaderboard.md, leaderboard.html, *.png). Default: leaderboard")


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark kernels or a checkpoint's generation speed (tables + JSON)",
                           description="Benchmarks, not tests: configurations are timed side by side in one process, "
                                       "interleaved, medians of the rounds; ratios are the numbers to quote.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    bk = bsub.add_parser("kernels", help="one layer's matmul: llmq kernels against dense fp32 / bf16 (fp16 on GPU)",
                         description="Time one quantized layer's matmul per (K, N) shape and batch size M against dense "
                                     "matmuls: µs, TFLOP/s, GB/s, %% of the measured copy bandwidth, speedup vs bf16 "
                                     "(fp16 on GPU). Weights are cycled through distinct copies so they come from memory.",
                         epilog="Example: llmq bench kernels --bits 4 --group-size 128 --m 1 16 128 --json benchmarks/results/kernels.json")
    bk.add_argument("--shape", nargs="+", metavar="KxN",
                    help="layer shapes in_features x out_features (default: SmolLM2's on CPU, 4096x4096 ... 8192x28672 on GPU)")
    bk.add_argument("--m", type=int, nargs="+", help="batch sizes (tokens) to sweep (default: 1 16 128 on CPU, 1 16 2048 on GPU)")
    bk.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS, help="weight bits. Default: 4")
    bk.add_argument("--group-size", type=int, default=128, help="group size; 0 = per channel. Default: 128")
    _add_timing_args(bk)
    bg = bsub.add_parser("generate", help="prefill and decode tokens/s and memory of a checkpoint against its base",
                         description="Greedy decoding with the KV cache from a random prompt, for the checkpoint and its base "
                                     "model in each dtype, timed round-robin. On CPU, llmq's packed kernels serve every "
                                     "dtype (bf16 inside). --compile times generate() with a static cache, eager and "
                                     "torch.compile'd side by side (compiling takes minutes).",
                         epilog="Example: llmq bench generate out/w4g64-sym --json benchmarks/results/generate-w4.json")
    bg.add_argument("checkpoint", help="a checkpoint folder or alias")
    bg.add_argument("--base", help="the full-precision model to compare with (default: the recipe's model, when known)")
    bg.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                    help="activation dtypes to run each model in. Default: float32 bfloat16")
    bg.add_argument("--prompt-tokens", type=int, default=128, help="prompt length. Default: 128")
    bg.add_argument("--new-tokens", type=int, default=64, help="tokens to decode. Default: 64")
    bg.add_argument("--compile", action="store_true",
                    help="also run each model torch.compile'd (generate() with a static cache for every row)")
    _add_timing_args(bg)


def _add_inspect(sub) -> None:
    ins = sub.add_parser("inspect", help="say what kind of checkpoint a folder holds",
                         description="Read a checkpoint folder's config.json (no weights) and say what it is and whether "
                                     "llmq can import it.")
    ins.add_argument("checkpoint", help="a checkpoint folder")


def _validate(args) -> None:
    from .pipeline import scheme_label, validate

    recipe = validate(args.recipe, check_model=not args.no_model)
    print(f"ok: {args.recipe} ({recipe.method.name}, {scheme_label(recipe)}, model {recipe.model})")


def _run(args) -> None:
    from .pipeline import run

    result = run(args.recipe, overwrite=args.overwrite, output_dir=args.output, resume=args.resume)
    if result is not None:  # None: a non-main process of a distributed run
        print(f"done: {result.output_dir} (report.json, README.md, model.safetensors)")


def _export_or_import(args) -> None:
    from . import formats

    if args.command == "export":
        done = formats.export_checkpoint(args.checkpoint, args.output, args.format, args.gptq_version, args.overwrite,
                                         args.embeddings, args.tokenizer_pre)
    else:
        done = formats.import_checkpoint(args.checkpoint, args.output, args.overwrite)
    print(f"done: {done.output_dir} ({done.layers} quantized layers, {done.format}; source: {done.source.label})")
    for note in done.notes:
        print(f"note: {note}")


def _limit(text: str) -> int | float:
    """--limit as lm-eval takes it: a count (50) or a fraction below 1 (0.1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of documents (50) or a fraction below 1 (0.1)") from None
    return int(value) if value.is_integer() else value


def _eval(args) -> None:
    from rich.console import Console

    from .evaluation import suite as suites
    from .evaluation.store import ResultsStore
    from .evaluation.suite_run import evaluate_suite, samples_path, suite_output, write_outputs
    from .io import check_output_file
    from .reporting.tables import results_table

    if args.tasks and args.suite:
        raise BadInputError("--tasks and --suite both name what to run: give one")
    if args.log_samples and not args.output_path:
        raise BadInputError("--log-samples writes beside the results: give --output-path too")
    suite = suites.from_tasks(args.tasks) if args.tasks else suites.load(args.suite or "quick")
    suite = suite.with_shots(args.num_fewshot).with_limit(args.limit).with_chat_template(args.apply_chat_template)
    if args.word_perplexity and not any(t.task == "llmq_wikitext" for t in suite.tasks):
        suite = suite.model_copy(update={"tasks": [*suite.tasks, suites.TaskSpec(task="llmq_wikitext", metric="word_perplexity")]})
    output = suite_output(args.output_path) if args.output_path else None  # a bad path fails before any work
    if output is not None and args.log_samples:
        for t in suite.tasks:
            check_output_file(samples_path(output, t.task), overwrite=False)
    run = evaluate_suite(args.checkpoint, suite, ResultsStore(args.store), name=args.name, base=args.base,
                         batch_size=args.batch_size, log_samples=args.log_samples)
    if run is not None:
        Console().print(results_table(run))
        if output is not None:
            written = write_outputs(run, suite, output)
            print(f"results written: {', '.join(str(p) for p in written)}")


def _leaderboard(args) -> None:
    from .reporting.leaderboard import build

    done = build(args.store, args.suite, args.out)
    print(f"done: {', '.join(str(p) for p in done.files)} ({done.rows} rows)")


def _bench(args) -> None:
    from rich.console import Console

    from . import bench

    if args.bench == "kernels":
        shapes = None
        if args.shape:
            try:
                shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shape]
            except ValueError:
                raise BadInputError(f"--shape {' '.join(args.shape)}: expected KxN, e.g. 4096x11008") from None
        result = bench.bench_kernels(shapes, args.m, args.bits, args.group_size or None, args.device, args.rounds)
        table = bench.kernels_table(result)
    else:
        result = bench.bench_generate(args.checkpoint, args.base, tuple(args.dtype), args.prompt_tokens, args.new_tokens,
                                      args.rounds, args.device, compile=args.compile)
        table = bench.generate_table(result)
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)  # piped to a file: keep every column readable
    out.print(table)
    if args.json:
        print(f"wrote {bench.write_json(result, args.json)}")


def _inspect(args) -> None:
    from . import formats

    found = formats.detect(args.checkpoint)
    verdict = "llmq reads it" if found.kind in ("llmq", "full-precision") else (
        "llmq imports it (llmq import)" if found.importable else f"llmq cannot import it: {found.problem}")
    print(f"{args.checkpoint}: {found.label}; {verdict}")


COMMANDS = {"validate": _validate, "run": _run, "export": _export_or_import, "import": _export_or_import, "eval": _eval,
            "leaderboard": _leaderboard, "bench": _bench, "inspect": _inspect}


def _leave_process_group() -> None:
    """Under a distributed launch, destroy this process's process group before it exits: left to interpreter
    shutdown, gloo's threads can abort a finished process ('terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _show_messages(command: str) -> None:
    """llmq's log messages on the terminal: `llmq run` beside its per-layer table on stdout, every other command on
    stderr (its stdout is its result); only the main process of a distributed launch speaks."""
    from rich.console import Console

    from .environment import is_main_process
    from .logs import show_on

    show_on(Console(stderr=command != "run"), level=logging.INFO if is_main_process() else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _show_messages(args.command)
        COMMANDS[args.command](args)
        _leave_process_group()
        return 0
    except BadInputError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2
    except LlmqError as e:
        print(f"llmq: failed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llmq: interrupted (no partial checkpoint was left in place)", file=sys.stderr)
        return 130
    except Exception as e:
        if _disk_full(e):
            print(f"llmq: failed: no space left on device ({getattr(e, 'filename', None) or e}); outputs are renamed into "
                  "place only when whole, so nothing half-written was left in place and an earlier output is replaced "
                  "only by a complete new one", file=sys.stderr)
            return 1
        return _unexpected(e)


def _disk_full(e: Exception) -> bool:
    """A full disk, as Python (OSError ENOSPC), torch.save (RuntimeError) and safetensors (SafetensorError) say it."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text


def _unexpected(e: Exception) -> int:
    """The last resort: still one line, the traceback on request."""
    if os.environ.get("LLMQ_DEBUG"):
        raise e
    print(f"llmq: failed: {type(e).__name__}: {e} (set LLMQ_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
