"""The config reference (`megamt config reference`, docs/config.md) comes from the config
tree's own docstrings: every key documented, the checked-in file current, the CLI prints it."""

from pathlib import Path

import pytest

from megamt import config_reference as R
from megamt.config import ConfigError, load_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_key_has_a_meaning():
    assert R.undocumented() == []


def test_docs_config_md_is_current():
    """Regenerate with: megamt config reference --markdown > docs/config.md"""
    assert DOCS.read_text(encoding="utf-8") == R.reference_markdown(), \
        "docs/config.md is stale: run `megamt config reference --markdown > docs/config.md`"


def test_reference_lists_every_input_option_with_type_and_default():
    keys = {k.key: k for k in R.iter_keys()}
    for opt in ("path", "format", "hf_split", "hf_name", "quoting", "columns", "max_examples"):
        assert f"tasks.<task>.inputs.<split>.{opt}" in keys, opt
    q = keys["tasks.<task>.inputs.<split>.quoting"]
    assert q.type == "bool or null" and q.default == "null" and "csv" in q.doc
    assert keys["data.overlong"].type == "truncate | reject" and keys["data.overlong"].default == '"truncate"'
    assert keys["mixture.phases[i].start_step"].type == "int"
    assert keys["model.lora.r"].default == "8"


def test_cli_prints_the_reference(capsys):
    from megamt.cli import main

    with pytest.raises(SystemExit):
        main(["config", "--help"])
    out = capsys.readouterr().out
    assert "tasks.<task>.inputs.<split>.columns" in out and "train.run_dir" in out
    assert main(["config", "reference", "--markdown"]) == 0
    assert capsys.readouterr().out == R.reference_markdown()


def test_config_show_and_env_expansion(tmp_path, monkeypatch, capsys):
    from megamt.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("tasks:\n  t: {inputs: {train: {path: a.csv}}}\nmodel: {name_or_path: '${MY_MODEL}/x'}\n")
    monkeypatch.delenv("MY_MODEL", raising=False)
    with pytest.raises(ConfigError, match=r"model.name_or_path: \$\{MY_MODEL\} is not set"):
        load_config(spec)
    monkeypatch.setenv("MY_MODEL", "/models/m")
    assert load_config(spec).model.name_or_path == "/models/m/x"
    assert main(["config", "show", str(spec), "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "/models/m/x" in out
    assert main(["config", "show", str(spec), "train.max_stepz=7"]) == 2
    assert "train.max_stepz: unknown config key" in capsys.readouterr().err
