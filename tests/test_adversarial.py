"""Bad input, as a careful new user and as an attacker would try it: the catalogue.

Each entry is data: what is given to `llmq` (a recipe edit, a file, a folder, a command line), the exit code it must
get and a fragment of the one line it must print. Afterwards every file and folder must be as it was: nothing
written, an earlier output untouched. Every entry runs the real CLI in this process on the tiny model, with model
loading made to fail: none of them may read a weight, so each fails in a few seconds. The results store, planted files and interrupted or
concurrent runs follow the catalogue as tests of their own.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import llmq
from llmq.cli import main
from llmq.errors import LlmqError
from llmq.evaluation.store import Key, ResultsStore


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, dict], list[str]]  # (input folder, a valid tiny recipe) -> the command line after `llmq`
    exit: int
    says: str


def _recipe(folder: Path, recipe: dict, name: str = "r.yaml") -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe) if not isinstance(recipe, str) else recipe)
    return str(path)


def run_with(**edits) -> Callable[[Path, dict], list[str]]:
    """`llmq run` on the tiny recipe with top-level keys replaced (None removes a key)."""

    def make(folder: Path, recipe: dict) -> list[str]:
        edited = {k: v for k, v in {**recipe, **edits}.items() if v is not None}
        return ["run", _recipe(folder, edited)]

    return make


def run_nested(section: str, **edits) -> Callable[[Path, dict], list[str]]:
    """`llmq run` on the tiny recipe with keys of one section replaced."""

    def make(folder: Path, recipe: dict) -> list[str]:
        base = recipe.get(section) if isinstance(recipe.get(section), dict) else {}
        return ["run", _recipe(folder, {**recipe, section: {**base, **edits}})]

    return make


def run_text(text: str | bytes) -> Callable[[Path, dict], list[str]]:
    def make(folder: Path, recipe: dict) -> list[str]:
        path = folder / "r.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", str(path)]

    return make


def with_file(name: str, content: bytes | None, then: Callable[[str], Callable]) -> Callable[[Path, dict], list[str]]:
    """Write input file `name` (None: make it a folder), then build the case from its path."""

    def make(folder: Path, recipe: dict) -> list[str]:
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.write_bytes(content)
        return then(str(path))(folder, recipe)

    return make


def gptq_calibrated_on(spec: str) -> Callable:
    return run_with(method={"name": "gptq"}, calibration={"data": spec, "n_samples": 2, "seqlen": 16})


def qat_trained_on(spec: str) -> Callable:
    return run_with(method={"name": "qat"}, training={"data": spec, "seqlen": 16, "batch_size": 2,
                                                       "micro_batch_size": 2, "budget": 1})


def suite_file(folder: Path, tasks: list[dict]) -> str:
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "adv", "tasks": tasks}))
    return str(path)


def with_suite(thresholds: dict | None = None, baseline: bool = True) -> Callable:
    def make(folder: Path, recipe: dict) -> list[str]:
        suite = suite_file(folder, [{"task": "llmq_arc_easy", "limit": 2}])
        ev = {**recipe["eval"], "suite": suite, "baseline": baseline, **({"thresholds": thresholds} if thresholds else {})}
        return ["run", _recipe(folder, {**recipe, "eval": ev})]

    return make


def other_model(kind: str) -> Callable:
    """A model folder that is not a full-precision checkpoint llmq can quantize."""

    def make(folder: Path, recipe: dict) -> list[str]:
        model = folder / "model"
        model.mkdir()
        if kind == "no-config":
            (model / "model.safetensors").write_bytes(b"x")
        elif kind == "bad-json":
            (model / "config.json").write_text("{not json")
        elif kind == "quantized":
            (model / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
                "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}}))
        elif kind == "foreign-quant":
            (model / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
                "quant_method": "awq", "bits": 4}}))
        return ["run", _recipe(folder, {**recipe, "model": str(model)})]

    return make


def existing_output(then: Callable) -> Callable:
    """An earlier output folder in the way (with a marker file the case must leave untouched)."""

    def make(folder: Path, recipe: dict) -> list[str]:
        out = Path(recipe["output"]["dir"])
        out.mkdir(parents=True)
        (out / "marker.txt").write_text("earlier output")
        return then(folder, recipe)

    return make


def command(*argv: str, files: dict[str, bytes | None] | None = None) -> Callable:
    """Any other command line; `{in}` in an argument is the input folder, `{model}` the tiny model."""

    def make(folder: Path, recipe: dict) -> list[str]:
        for name, content in (files or {}).items():
            path = folder / name
            if content is None:
                path.mkdir(parents=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        return [a.replace("{in}", str(folder)).replace("{model}", recipe["model"]) for a in argv]

    return make


def _escaping_index(folder: Path, recipe: dict) -> list[str]:
    """A GPTQ-looking checkpoint whose index names a shard outside its folder, given to `llmq import`."""
    q = folder / "q"
    q.mkdir()
    config = json.loads((Path(recipe["model"]) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
    (q / "config.json").write_text(json.dumps(config))
    (q / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.mlp.up_proj.qweight": "../../outside.safetensors"}}))
    return ["import", str(q), str(folder / "out")]


DEEP_YAML = "a: " + "[" * 5000 + "]" * 5000
QUANTIZED_CONFIG = json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "llmq", "bits": 4}})

CATALOGUE = [
    # ------------------------------------------------------------------ recipe: keys, types, values
    Case("unknown top-level key", run_with(modle="x"), 2, "modle: unknown key"),
    Case("unknown nested key", run_nested("scheme", bitz=4), 2, "scheme.bitz: unknown key"),
    Case("bits not supported", run_nested("scheme", bits=7), 2, "scheme.bits: 7 is not supported"),
    Case("bits not a number", run_nested("scheme", bits="four"), 2, "scheme.bits"),
    Case("group size zero", run_nested("scheme", group_size=0), 2, "must be a positive integer"),
    Case("group size negative", run_nested("scheme", group_size=-64), 2, "must be a positive integer"),
    Case("group size does not divide a layer", run_nested("scheme", group_size=48), 2, "48 does not divide in_features 64"),
    Case("unknown preset", run_with(scheme="W5A16"), 2, "unknown preset 'W5A16'"),
    Case("bitsandbytes format with other bits", run_nested("scheme", format="nf4", bits=3), 2, "format nf4 needs 4"),
    Case("unknown scheme format", run_nested("scheme", format="fp8"), 2, "scheme.format"),
    Case("method unknown", run_with(method="awq"), 2, "method"),
    Case("gptq key with rtn", run_with(method={"name": "rtn", "damp": 0.1}), 2, "damp applies to method gptq"),
    Case("qat key with gptq", run_with(method={"name": "gptq", "init": "gptq"}), 2, "init applies to method qat only"),
    Case("qat with nothing to train", run_with(method={"name": "qat", "train_weights": False, "learn_scales": False,
                                                       "learn_zero_points": False}), 2, "has nothing to train"),
    Case("training section with rtn", run_with(training={"budget": 3}), 2, "training applies to method qat only"),
    Case("int8 format by gptq", run_with(method="gptq", scheme="LLM_INT8"), 2, "cannot produce format int8"),
    Case("bitsandbytes rtn with clipping", run_with(method={"name": "rtn", "clip": "mse"}, scheme="NF4"), 2,
         "clip must be minmax"),
    Case("damping out of range", run_with(method={"name": "gptq", "damp": -1}), 2, "method.damp"),
    Case("calibration on the evaluation text", lambda f, r: run_with(method="gptq", calibration={"data": r["eval"]["data"]})(f, r),
         2, "never calibrate on the evaluation text"),
    Case("training on the evaluation text", lambda f, r: qat_trained_on(r["eval"]["data"])(f, r), 2,
         "never train on the evaluation text"),
    Case("two QAT budgets", run_with(method="qat", training={"budget": {"steps": 3, "minutes": 1}}), 2,
         "exactly one of steps, tokens or minutes"),
    Case("micro batch does not divide batch", run_with(method="qat", training={"batch_size": 4, "micro_batch_size": 3}),
         2, "does not divide batch_size"),
    Case("output dtype unknown", run_nested("output", dtype="float8"), 2, "output.dtype"),
    Case("eval seqlen too small", run_nested("eval", seqlen=4), 2, "eval.seqlen"),
    Case("calibration windows zero", run_with(method="gptq", calibration={"n_samples": 0}), 2, "calibration.n_samples"),
    Case("targets not a regex", run_with(targets=["(["]), 2, "is not a valid regular expression"),
    Case("targets select nothing", run_with(targets=["nothing_here"]), 2, "select no Linear layer"),
    Case("tied lm_head targeted", run_with(ignore=[]), 2, "tied to the input embeddings"),
    Case("override matching no layer", run_with(overrides=[{"targets": [".*nope"], "bits": 8}]), 2,
         "overrides[0].targets ['.*nope'] match no targeted Linear layer"),
    Case("override without a scheme", run_with(overrides=[{"targets": [".*q_proj"]}]), 2, "give the scheme keys that change"),
    Case("override group size does not divide", run_with(overrides=[{"targets": [".*q_proj"], "group_size": 48}]), 2,
         "overrides[0].group_size: 48 does not divide in_features 64"),
    Case("budget below the smallest model", run_nested("scheme", budget={"bits_per_weight": 1.0}), 2,
         "scheme.budget.bits_per_weight: 1.0 is below the smallest model"),
    Case("budget with two sizes", run_nested("scheme", budget={"bits_per_weight": 4, "size_mb": 1}), 2,
         "give exactly one of bits_per_weight or size_mb"),
    Case("budget candidate unknown", run_nested("scheme", budget={"bits_per_weight": 4, "candidates": ["W7g64"]}), 2,
         "is neither a short name"),
    Case("budget with a bitsandbytes format", run_with(scheme={"preset": "NF4", "budget": {"bits_per_weight": 4}}), 2,
         "overrides and budgets mix integer schemes only"),
    Case("model empty", run_with(model=" "), 2, "must name a model"),
    Case("model missing", run_with(model=None), 2, "model: required key is missing"),
    # ------------------------------------------------------------------ recipe: names and places
    Case("name climbs out of out/", run_with(name="../../x", output=None), 2, "a recipe name is a plain name"),
    Case("name with a separator", run_with(name="a/b", output=None), 2, "a recipe name is a plain name"),
    Case("name is ..", run_with(name="..", output=None), 2, "a recipe name is a plain name"),
    Case("name starts with a dot", run_with(name=".x", output=None), 2, "a recipe name is a plain name"),
    Case("recipe file named ..yaml, no name", command("run", "{in}/..yaml", files={"..yaml": b"model: m\n"}), 2,
         "a recipe name is a plain name"),
    Case("existing output without --overwrite", existing_output(run_with()), 2, "already exists"),
    Case("--resume with nothing to resume", lambda f, r: [*run_with()(f, r), "--resume"], 2, "there is no interrupted run"),
    # ------------------------------------------------------------------ recipe file itself
    Case("recipe is a list", run_text("- model: x\n"), 2, "expected a mapping"),
    Case("recipe is empty", run_text(""), 2, "expected a mapping"),
    Case("recipe is not YAML", run_text("model: [\n"), 2, "not valid YAML"),
    Case("recipe nested too deeply", run_text(DEEP_YAML), 2, "nested too deeply"),
    Case("recipe not UTF-8", run_text(b"model: \xff\xfe\n"), 2, "not valid YAML"),
    Case("recipe path is a folder", command("run", "{in}/recipe.yaml", files={"recipe.yaml": None}), 2,
         "is a folder, not a recipe file"),
    Case("recipe path missing", command("run", "{in}/nope.yaml"), 2, "does not exist"),
    # ------------------------------------------------------------------ data specs
    Case("eval data unknown spec", run_nested("eval", data="wikii"), 2, "'wikii' is not recognised"),
    Case("eval data missing file", run_nested("eval", data="/nonexistent/x.txt"), 2, "file not found"),
    Case("eval data folder named like a file", with_file("x.txt", None, lambda p: run_nested("eval", data=p)), 2,
         "is a folder, not a file"),
    Case("eval data corrupt gzip", with_file("c.jsonl.gz", b"\x1f\x8b\x08\x00garbage-not-deflate" * 4,
                                             lambda p: run_nested("eval", data=p)), 2, "cannot read it"),
    Case("eval data truncated gzip", with_file("t.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 200)[:40],
                                               lambda p: run_nested("eval", data=p)), 2, "cannot read it"),
    Case("eval data jsonl without text", with_file("n.jsonl", b'{"body": "x"}\n', lambda p: run_nested("eval", data=p)),
         2, '"text"'),
    Case("eval data jsonl not JSON", with_file("j.jsonl", b"{nope\n", lambda p: run_nested("eval", data=p)), 2, "j.jsonl"),
    Case("eval data empty", with_file("e.txt", b"  \n", lambda p: run_nested("eval", data=p)), 2, "has no text"),
    Case("eval data not UTF-8", with_file("b.txt", b"\xff\xfe\xfa", lambda p: run_nested("eval", data=p)), 2,
         "cannot read it as utf-8"),
    Case("eval data from the hub, offline", run_nested("eval", data="hf:wikitext:wikitext-2-raw-v1:test"), 2, "hf:"),
    Case("calibration data corrupt gzip", with_file("c.jsonl.gz", b"\x1f\x8b\x08\x00junk" * 8, gptq_calibrated_on), 2,
         "cannot read it"),
    Case("training data missing", qat_trained_on("/nonexistent/train.txt"), 2, "file not found"),
    # ------------------------------------------------------------------ evaluation suites and the gate
    Case("eval suite unknown", run_nested("eval", suite="no-such-suite"), 2, "suite 'no-such-suite' not found"),
    Case("suite task unknown", lambda f, r: run_nested("eval", suite=suite_file(f, [{"task": "llmq_arc_esay"}]))(f, r),
         2, "unknown task 'llmq_arc_esay'"),
    Case("threshold task not in suite", with_suite({"min_recovery": {"piqa": 0.9}}), 2, "has no task 'piqa'"),
    Case("threshold without suite", run_nested("eval", thresholds={"min_recovery": {"arc_easy": 0.9}}), 2,
         "needs eval.suite"),
    Case("threshold without baseline", with_suite({"max_ppl_increase": 0.1}, baseline=False), 2, "eval.baseline: true"),
    Case("threshold not a ratio", run_nested("eval", thresholds={"max_ppl_increase": -1}), 2, "max_ppl_increase"),
    # ------------------------------------------------------------------ models
    Case("model folder without config.json", other_model("no-config"), 2, "no config.json"),
    Case("model config not JSON", other_model("bad-json"), 2, "not valid JSON"),
    Case("model already quantized", other_model("quantized"), 2, "llmq quantizes full-precision checkpoints"),
    Case("model in a format llmq does not read", other_model("foreign-quant"), 2, "llmq quantizes full-precision"),
    Case("model hub id offline", run_with(model="no-org/no-model"), 2, "hub"),
    Case("model .gguf missing", run_with(model="/nonexistent/m.gguf"), 2, "no such .gguf file"),
    Case("model .gguf corrupt", with_file("m.gguf", b"GGUF-not-really", lambda p: run_with(model=p)), 2,
         "cannot read this .gguf file"),
    # ------------------------------------------------------------------ checkpoints: export, import, inspect, eval
    Case("export a full-precision model", command("export", "{model}", "{in}/out", "--format", "gptq"), 2,
         "not an llmq checkpoint"),
    Case("export to an unknown format", command("export", "{model}", "{in}/out", "--format", "awq"), 2, "invalid choice"),
    Case("export a folder without config", command("export", "{in}/empty", "{in}/out", "--format", "gptq",
                                                   files={"empty": None}), 2, "no config.json"),
    Case("import a full-precision model", command("import", "{model}", "{in}/out"), 2, "a full-precision checkpoint"),
    Case("import a quantization_config that is not a mapping",
         command("import", "{in}/q", "{in}/out", files={"q/config.json": b'{"quantization_config": [1]}'}), 2,
         "unreadable quantization_config"),
    Case("inspect a folder without config", command("inspect", "{in}/empty", files={"empty": None}), 2,
         "no config.json"),
    Case("inspect a config that is a JSON list", command("inspect", "{in}/m", files={"m/config.json": b"[]"}), 2,
         "expected a JSON object"),
    Case("inspect a config nested too deeply", command("inspect", "{in}/m", files={
        "m/config.json": b"[" * 100000 + b"]" * 100000}), 2, "nested too deeply"),
    Case("import compressed-tensors groups that are a list", command("import", "{in}/q", "{in}/out", files={
        "q/config.json": json.dumps({"quantization_config": {"quant_method": "compressed-tensors",
                                                             "config_groups": [1]}}).encode()}), 2,
         "config_groups is not a mapping"),
    Case("inspect a config that is not JSON", command("inspect", "{in}/m", files={"m/config.json": b"\xff{"}), 2,
         "not valid JSON"),
    Case("eval an unknown suite", command("eval", "{model}", "--suite", "no-such-suite"), 2, "not found"),
    Case("eval a missing checkpoint", command("eval", "{in}/missing", "--suite", "quick", "--limit", "1"), 2,
         "does not exist"),
    Case("model index with a shard outside the folder", lambda f, r: _escaping_index(f, r), 1,
         "shards are .safetensors files in the checkpoint's own folder"),
    Case("leaderboard of an empty store", command("leaderboard", "--store", "{in}/store.jsonl", "--out", "{in}/lb"), 2,
         "no results for suite"),
    Case("bench kernels with a bad shape", command("bench", "kernels", "--shape", "64by32"), 2, "expected KxN"),
]


def _files(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) below `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_fails_cleanly_and_writes_nothing(case, tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # out/<name> of a recipe without output.dir lands here, where it is checked
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMQ_RESULTS", str(tmp_path / "store.jsonl"))
    inputs = tmp_path / "in"
    inputs.mkdir()
    argv = case.make(inputs, tiny_recipe)

    def no_weights(*args, **kwargs):
        raise AssertionError("a refused input must be refused before any weight is read")

    for module in ("llmq.pipeline.stages", "llmq.evaluation.suite_run"):
        monkeypatch.setattr(f"{module}.load_model", no_weights)
    before = _files(tmp_path)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse refuses a bad command line itself
            code = e.code
    seconds = time.perf_counter() - t
    err = capsys.readouterr().err.strip().splitlines()
    assert code == case.exit, err
    assert err and case.says in err[-1] and "Traceback" not in "\n".join(err), err
    assert _files(tmp_path) == before, "a refused input must leave every file as it was"
    assert seconds < 60, f"refused only after {seconds:.0f} s: the check must come before any heavy work"


def test_the_catalogue_is_broad():
    assert len(CATALOGUE) >= 60 and len({c.id for c in CATALOGUE}) == len(CATALOGUE)


# ------------------------------------------------------------------------------------------------- results store


def _record(i: int) -> dict:
    return {"metrics": {"acc": i / 10}, "samples": 1, "seconds": 0.1, "model": {"name": f"m{i}"}}


def _put(store: ResultsStore, i: int) -> None:
    store.put(Key(f"ck{i}", "s", "t", 0, None, "v"), **_record(i))


def test_store_appends_after_a_torn_line_lose_nothing(tmp_path):
    store = ResultsStore(tmp_path / "s.jsonl")
    _put(store, 1)
    with store.path.open("ab") as f:
        f.write(b'{"checkpoint": "torn", "metr')  # a writer killed mid-line
    _put(store, 2)
    with pytest.warns(UserWarning, match=r"s.jsonl:2: unreadable record skipped"):
        records = store.records()
    assert [r["checkpoint"] for r in records] == ["ck1", "ck2"]


@pytest.mark.parametrize("bad", [b"\xff\xfe not utf-8\n", b"[1, 2, 3]\n", b'"a string"\n', b"42\n", b"null\n"])
def test_store_skips_one_bad_line_and_keeps_the_rest(tmp_path, bad):
    store = ResultsStore(tmp_path / "s.jsonl")
    _put(store, 1)
    with store.path.open("ab") as f:
        f.write(bad)
    _put(store, 2)
    with pytest.warns(UserWarning, match=r"s.jsonl:2: unreadable record skipped"):
        assert [r["checkpoint"] for r in store.results()] == ["ck1", "ck2"]


def _append_many(path: str, start: int) -> None:
    store = ResultsStore(path)
    for i in range(start, start + 50):
        _put(store, i)


def test_store_concurrent_appends_lose_nothing(tmp_path):
    path = str(tmp_path / "s.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, 1000 * k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    got = sorted(r["checkpoint"] for r in ResultsStore(path).records())
    assert got == sorted(f"ck{1000 * k + i}" for k in range(4) for i in range(50))


# ------------------------------------------------------------------------------- planted files, interrupted runs


def test_a_planted_pickle_in_the_qat_state_is_refused_and_never_run(tiny_recipe, tmp_path):
    """A file planted next to the output as QAT's training state, with a valid-looking key: it is opened only with
    weights_only=True, so its code never runs."""
    from llmq.io import partial_dir
    from llmq.methods.qat.training import STATE, STATE_KEY

    tiny_recipe.update(eval=None, method={"name": "qat"})
    train = tmp_path / "train.txt"
    train.write_text(Path(tiny_recipe["model"]).joinpath("config.json").read_text() * 40)
    tiny_recipe["training"] = {"data": str(train), "seqlen": 16, "batch_size": 2, "micro_batch_size": 2, "budget": 1}
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    work = partial_dir(Path(tiny_recipe["output"]["dir"]))
    work.mkdir(parents=True)
    torch.save({"key": "x", "evil": Evil()}, work / STATE)
    with pytest.raises(LlmqError, match="different recipe or model"):  # no key file: refused before opening
        llmq.run(tiny_recipe)
    (work / STATE_KEY).write_text(json.dumps({"key": "forged", "step": 1}))
    with pytest.raises(LlmqError, match="different recipe or model"):
        llmq.run(tiny_recipe)
    assert not marker.exists()


def test_a_planted_pickle_with_the_right_key_is_still_never_run(tmp_path):
    from llmq.methods.qat.training import STATE, STATE_KEY, _saved_state

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"key": "k", "evil": Evil()}, tmp_path / STATE)
    (tmp_path / STATE_KEY).write_text(json.dumps({"key": "k", "step": 1}))
    with pytest.raises(LlmqError, match="not a training state llmq wrote"):
        _saved_state(tmp_path / STATE, "k")
    assert not marker.exists()


def test_two_runs_of_one_output_at_once_the_second_is_refused(tiny_recipe, capsys):
    from llmq.io import output_lock

    out = Path(tiny_recipe["output"]["dir"])
    with output_lock(out):  # as a first `llmq run` of this output does while it works
        with pytest.raises(llmq.BadInputError, match="another llmq run is writing"):
            llmq.run(tiny_recipe)
        assert not out.exists()
    tiny_recipe["eval"] = None
    assert llmq.run(tiny_recipe).output_dir == out  # the lock went with the first run
    assert not list(out.parent.glob(".*.lock"))


def test_a_full_disk_while_writing_shards_keeps_the_earlier_output(tiny_recipe, monkeypatch, capsys):
    """--overwrite over an earlier output, and the disk fills while the new one's shards are written (safetensors
    says so in its own words): the earlier output is still there, whole, and the message says what happened."""
    import yaml as _yaml

    from llmq.quantization import blockwise

    tiny_recipe["eval"] = None
    first = llmq.run(tiny_recipe).output_dir
    before = _files(first)

    def full(tensors, path):
        raise RuntimeError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: \"No space "
                           f"left on device\" }}) (os error 28) {path}")

    monkeypatch.setattr(blockwise, "_save_atomic", full)
    recipe_path = first.parent / "r.yaml"
    recipe_path.write_text(_yaml.safe_dump(tiny_recipe))
    assert main(["run", str(recipe_path), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "an earlier output is replaced only by a complete new one" in err
    assert _files(first) == before
    assert not list(first.parent.glob(".*.tmp*")), "no half-written file lingers"


# ------------------------------------------------------------------------- siblings: other files llmq reads back


@pytest.mark.parametrize("text", [b"method: [\n", b"\xff\xfe", b"- a list\n", ("a: " + "[" * 5000).encode()])
def test_a_damaged_recipe_yaml_in_a_checkpoint_only_loses_its_names(tmp_path, text):
    from llmq.evaluation.checkpoint_info import describe_checkpoint

    (tmp_path / "config.json").write_text(QUANTIZED_CONFIG)
    (tmp_path / "recipe.yaml").write_bytes(text)
    info = describe_checkpoint(str(tmp_path), tmp_path)
    assert info["kind"] == "llmq" and info["method"] == "llmq" and info["base"] is None


@pytest.mark.parametrize("text", [b"{torn", b"[1, 2]", b'{"recipe": "x"}', b"\xff"])
def test_a_damaged_report_json_gives_an_export_card_without_provenance(tmp_path, text):
    from llmq.reporting.cards import export_card

    (tmp_path / "report.json").write_bytes(text)
    card = export_card(tmp_path, "gptq v1", {"quant_method": "gptq"})
    assert "no readable report.json, so its provenance is unknown" in card


@pytest.mark.parametrize("text", [b"{torn", b"[]", b'{"run": "k"}', b'{"run": "k", "blocks_done": "1"}', b"\xff"])
def test_a_damaged_progress_file_is_refused_with_a_message(tmp_path, text):
    from llmq.quantization.resume import PROGRESS, blocks_done

    (tmp_path / PROGRESS).write_bytes(text)
    with pytest.raises(LlmqError, match="not a progress file llmq wrote"):
        blocks_done(tmp_path, "k")


def test_eval_of_a_checkpoint_that_fails_to_load_leaves_no_trace_in_the_store(tmp_path, capsys):
    """`llmq eval` of an llmq config without weights: refused with a message, and the store stays as it was (it
    used to get a description record of a checkpoint that was never scored)."""
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text(QUANTIZED_CONFIG)
    (tmp_path / "s.yaml").write_text("name: s\nperplexity: {data: wiki, seqlen: 16}\n")
    store = tmp_path / "store.jsonl"
    assert main(["eval", str(tmp_path / "q"), "--suite", str(tmp_path / "s.yaml"), "--store", str(store)]) == 1
    assert "safetensors" in capsys.readouterr().err
    assert not store.exists()
