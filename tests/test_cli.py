"""The `llmq` command as a user meets it: exit codes and one-line messages, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from llmq.cli import main


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmq: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"model": "m", "scheme": {"bits": 4, "grp": 64}}, "scheme.grp: unknown key"),
        ({"model": "m", "scheme": {"bits": "x"}}, "scheme.bits"),
        ({"model": "m", "scheme": {"bits": 7}}, "scheme.bits: 7 is not supported"),
        ("model: [", "not valid YAML"),
    ],
)
def test_validate_bad_recipes_exit_2(tmp_path, capsys, data, expected):
    assert main(["validate", "--no-model", _write(tmp_path, data)]) == 2
    assert expected in _one_line_error(capsys)


def test_validate_ok(tmp_path, capsys, tiny_model_dir):
    path = _write(tmp_path, {"model": str(tiny_model_dir), "scheme": {"bits": 4, "group_size": 32}})
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_validate_group_size_names_layer(tmp_path, capsys, tiny_model_dir):
    path = _write(tmp_path, {"model": str(tiny_model_dir), "scheme": {"bits": 4, "group_size": 48}})
    assert main(["validate", path]) == 2
    assert "48 does not divide in_features 64 of model.layers.0.self_attn.q_proj" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "model, expected",
    [
        ("./no/such/folder", "does not exist"),
        ("/tmp/nothing-here.gguf", "no such .gguf file"),
        ("some-org/some-model-that-is-not-cached", "hub cannot be reached"),
        ("not a model!", "does not exist"),
    ],
)
def test_bad_models_exit_2(tmp_path, capsys, monkeypatch, model, expected):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["validate", _write(tmp_path, {"model": model})]) == 2
    assert expected in _one_line_error(capsys)


def test_folder_without_config_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["validate", _write(tmp_path, {"model": str(tmp_path / "empty")})]) == 2
    assert "no config.json" in _one_line_error(capsys)


def test_run_existing_output_exit_2_then_overwrite(tmp_path, capsys, tiny_recipe):
    tiny_recipe["eval"] = None
    path = _write(tmp_path, tiny_recipe)
    assert main(["run", path]) == 0
    capsys.readouterr()
    assert main(["run", path]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert main(["run", path, "--overwrite"]) == 0


def test_run_missing_recipe_exit_2(capsys):
    assert main(["run", "/no/such/recipe.yaml"]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("run", "validate", "export", "import", "inspect"))
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", "run", "--help"], capture_output=True, text=True, timeout=120)
    assert "--overwrite" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", "export", "--help"], capture_output=True, text=True, timeout=120)
    assert "--gptq-version" in proc.stdout and "compressed-tensors" in proc.stdout


def test_validate_bad_eval_data_exit_2(tmp_path, capsys):
    path = _write(tmp_path, {"model": "m", "eval": {"data": "wikii"}})
    assert main(["validate", "--no-model", path]) == 2
    assert "'wikii'" in _one_line_error(capsys)
