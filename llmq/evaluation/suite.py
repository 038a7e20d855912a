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

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import BadInputError
from ..recipe import PerplexityConfig, Strict, first_error, load_yaml
from .harness import check_tasks as check_task_names
from .harness import task_names

SUITES_DIR = Path(__file__).resolve().parent / "suites"  # package data: a wheel carries it too


class TaskSpec(Strict):
    task: str = Field(min_length=1)  # lm-eval task or group name
    shots: int = Field(0, ge=0)
    limit: int | float | None = None  # documents (per subtask for a group), or a fraction of them below 1; None = all
    metric: str = "acc"  # the number tables, averages and recovery use

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        try:
            return None if v is None else check_limit(v)
        except BadInputError as e:
            raise ValueError(str(e)) from None

    @property
    def label(self) -> str:
        return self.task.removeprefix("llmq_")


class Suite(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    perplexity: PerplexityConfig | None = None
    tasks: list[TaskSpec] = []
    include: list[str] = []  # extra lm-eval task folders, relative to the suite file
    chat_template: bool = False  # prompts through the tokenizer's chat template (lm-eval's apply_chat_template)

    @model_validator(mode="after")
    def _distinct_labels(self) -> Suite:
        labels = [t.label for t in self.tasks]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"tasks: {twice[0]!r} appears twice (tables and thresholds name tasks by label)")
        return self

    def with_limit(self, limit: int | float | None) -> Suite:
        """The same suite with every task's limit replaced (``--limit``: documents, or a fraction of them below 1),
        named ``<name>-limit<N>`` so that its results never mix with the suite's own in the store or the
        leaderboard; unchanged for None."""
        if limit is None:
            return self
        limit = check_limit(limit)
        tasks = [t.model_copy(update={"limit": limit}) for t in self.tasks]
        return self.model_copy(update={"name": f"{self.name}-limit{limit}", "tasks": tasks})

    def with_shots(self, shots: int | None) -> Suite:
        """Every task at `shots` few-shot examples (``--num-fewshot``), named ``<name>-<N>shot``; unchanged for None."""
        if shots is None:
            return self
        if shots < 0:
            raise BadInputError(f"num_fewshot {shots}: expected 0 or more examples")
        tasks = [t.model_copy(update={"shots": shots}) for t in self.tasks]
        return self.model_copy(update={"name": f"{self.name}-{shots}shot", "tasks": tasks})

    def with_chat_template(self, on: bool) -> Suite:
        """Prompts through the tokenizer's chat template (``--apply-chat-template``)."""
        return self.model_copy(update={"chat_template": True}) if on else self

    @property
    def store_name(self) -> str:
        """The suite's name in the results store: ``<name>-chat`` with the chat template, so that the two prompt forms
        never share results (whether the template was set here or in the suite file)."""
        return f"{self.name}-chat" if self.chat_template and not self.name.endswith("-chat") else self.name


def check_limit(limit: int | float) -> int | float:
    """A limit as lm-eval reads it: a whole number of documents (1 or more), or a fraction of them in (0, 1)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise BadInputError(f"limit {limit!r}: expected a number of documents or a fraction below 1")
    if float(limit).is_integer() and limit >= 1:
        return int(limit)
    if 0 < limit < 1:
        return float(limit)
    raise BadInputError(f"limit {limit}: expected a positive number of documents per task, or a fraction in (0, 1)")


def from_tasks(spec: str, check_tasks: bool = True) -> Suite:
    """A suite of the comma-separated tasks in `spec` (``--tasks arc_easy,boolq``), by label or lm-eval task name, at
    0 shots (lm-eval's default for these tasks; ``with_shots`` for others). A task the packaged suites define is
    scored by the metric they use (quick's first), any other by accuracy. Named ``tasks-<labels>``, so its results
    keep their own rows in the store."""
    labels = [t.strip() for t in spec.split(",") if t.strip()]
    if not labels:
        raise BadInputError(f"--tasks {spec!r}: name at least one task (comma-separated, e.g. arc_easy,boolq)")
    known: dict[str, TaskSpec] = {}
    for name in sorted(available(), key=lambda n: n != "quick"):
        for t in load(name, check_tasks=False).tasks:
            known.setdefault(t.label, TaskSpec(task=t.task, metric=t.metric))
    offline = set(task_names())
    tasks = []
    for label in labels:
        plain = label.removeprefix("llmq_")
        if plain in known:
            tasks.append(known[plain])
        else:  # the offline folder names its tasks llmq_<label>
            tasks.append(TaskSpec(task=f"llmq_{plain}" if f"llmq_{plain}" in offline else label))
    try:
        suite = Suite(name="tasks-" + "+".join(t.label for t in tasks), tasks=tasks)
    except ValidationError as e:
        raise BadInputError(f"--tasks {spec!r}: {first_error(e, Suite)}") from None
    if check_tasks:
        check_task_names([t.task for t in suite.tasks], ())
    return suite


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
