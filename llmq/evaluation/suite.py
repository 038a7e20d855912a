"""Evaluation suites: which lm-eval tasks, at how many shots, on how many documents, scored by which metric.

Why it exists: a leaderboard row means something only if every row ran the same tasks the same way, so the choice
lives in data (``llmq/evaluation/suites/<name>.yaml``), validated here before any model is loaded. A suite names tasks by
their lm-eval task name (``llmq_arc_easy``); tables, thresholds and the leaderboard use the short label
(``arc_easy``). A suite may also run the perplexity protocol (DESIGN.md) and add its own task folders (``include``,
relative to the suite file), which is how tests and users bring tasks of their own.

Deliberately not here: running anything (suite_run.py, harness.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from ..errors import BadInputError
from ..recipe import PerplexityConfig, Strict, first_error, load_yaml
from .harness import check_tasks as check_task_names

SUITES_DIR = Path(__file__).resolve().parent / "suites"  # package data: a wheel carries it too


class TaskSpec(Strict):
    task: str = Field(min_length=1)  # lm-eval task or group name
    shots: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)  # documents (per subtask for a group); None = all
    metric: str = "acc"  # the number tables, averages and recovery use

    @property
    def label(self) -> str:
        return self.task.removeprefix("llmq_")


class Suite(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    perplexity: PerplexityConfig | None = None
    tasks: list[TaskSpec] = []
    include: list[str] = []  # extra lm-eval task folders, relative to the suite file

    @model_validator(mode="after")
    def _distinct_labels(self) -> Suite:
        labels = [t.label for t in self.tasks]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"tasks: {twice[0]!r} appears twice (tables and thresholds name tasks by label)")
        return self

    def with_limit(self, limit: int | None) -> Suite:
        """The same suite with every task's limit replaced (``--limit``), named ``<name>-limit<N>`` so that its
        results never mix with the suite's own in the store or the leaderboard; unchanged for None."""
        if limit is None:
            return self
        if limit < 1:
            raise BadInputError(f"limit {limit}: expected a positive number of documents per task")
        tasks = [t.model_copy(update={"limit": limit}) for t in self.tasks]
        return self.model_copy(update={"name": f"{self.name}-limit{limit}", "tasks": tasks})


def available() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load(spec: str, check_tasks: bool = True) -> Suite:
    """A suite by name (``quick``, ``leaderboard``: llmq/evaluation/suites/<name>.yaml) or by path to a YAML file; its task
    names are checked against lm-eval's task index unless `check_tasks` is False."""
    path = Path(spec).expanduser()
    if not (spec.endswith((".yaml", ".yml")) and path.is_file()):
        path = SUITES_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise BadInputError(f"suite {spec!r} not found: expected one of {', '.join(available()) or '(none installed)'} "
                                "or a path to a suite .yaml file")
    raw = load_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: expected a mapping with name, tasks, perplexity")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        raise BadInputError(f"{path}: {first_error(e, Suite)}") from None
    if not suite.tasks and suite.perplexity is None:
        raise BadInputError(f"{path}: a suite needs tasks, perplexity or both")
    suite = suite.model_copy(update={"include": [str((path.parent / p).resolve()) for p in suite.include]})
    if check_tasks and suite.tasks:
        check_task_names([t.task for t in suite.tasks], tuple(suite.include))
    return suite
