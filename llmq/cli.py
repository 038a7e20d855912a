"""The `llmq` command: a thin layer over the Python API that turns failures into one-line messages.

Exit codes: 0 ok, 2 bad input (recipe, model or data spec, existing output), 1 any other failure,
130 interrupted. Set LLMQ_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import BadInputError, LlmqError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmq",
        description="Quantize Hugging Face causal LMs and measure what it cost.",
        epilog="Example: llmq run recipes/quickstart.yaml",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"llmq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="quantize, save, reload and evaluate as a recipe says",
                         description="Run a recipe end to end: quantize, save safetensors, reload with from_pretrained, "
                                     "evaluate base and quantized perplexity, write report.json and a model card.")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument("-o", "--output", help="output folder (default: the recipe's output.dir, else out/<recipe name>)")
    run.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    val = sub.add_parser("validate", help="check a recipe without running it",
                         description="Validate a recipe: keys, types, values, and (unless --no-model) that its scheme "
                                     "fits the model's layers. Reads no weights.")
    val.add_argument("recipe", help="path to a recipe YAML file")
    val.add_argument("--no-model", action="store_true", help="check the recipe alone, without resolving the model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            from .pipeline import scheme_label, validate

            recipe = validate(args.recipe, check_model=not args.no_model)
            print(f"ok: {args.recipe} ({recipe.method.name}, {scheme_label(recipe)}, model {recipe.model})")
        elif args.command == "run":
            from .pipeline import run

            result = run(args.recipe, overwrite=args.overwrite, output_dir=args.output)
            print(f"done: {result.output_dir} (report.json, README.md, model.safetensors)")
        return 0
    except BadInputError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2
    except LlmqError as e:
        print(f"llmq: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmq: interrupted (no partial checkpoint was left in place)", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: still one line, traceback on request
        if os.environ.get("LLMQ_DEBUG"):
            raise
        print(f"llmq: failed: {type(e).__name__}: {e} (set LLMQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
