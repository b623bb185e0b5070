"""The typed config tree: YAML + dotted overrides, errors naming the key, aliases."""

from __future__ import annotations

import pytest

from megamt.config import (ConfigError, DataConfig, InputConfig, MultitaskConfig, TaskConfig, config_from_dict,
                           load_config)

BASE = ["model.from_config.model_type=llama"]


def _problems(fn) -> list[str]:
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems


def test_yaml_then_overrides_then_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name_or_path: /m}\n"
                 "tasks:\n  s: {task_type: classification, inputs: {train: {path: data/s.tsv}}}\n"
                 "data: {seq_len: 256}\n")
    cfg = load_config(f, ["data.seq_len=1024", "train.lr=3e-3", "tasks.s.weight=2"])
    assert cfg.data.seq_len == 1024 and cfg.train.lr == pytest.approx(0.003)
    assert cfg.tasks["s"].weight == 2.0 and cfg.data.pack_buffer == DataConfig().pack_buffer
    # relative input paths resolve against the YAML file's folder
    assert cfg.tasks["s"].inputs["train"].path == str((tmp_path / "data/s.tsv").resolve())


def test_unknown_keys_and_wrong_types_are_named_together():
    problems = _problems(lambda: load_config(None, BASE + ["train.bogus=1", "data.seq_len=abc", "train.lr=fast",
                                                           "train.progress_bar=maybe"]))
    text = "\n".join(problems)
    assert "train.bogus: unknown config key" in text
    assert "data.seq_len: expected an integer" in text
    assert "train.lr: expected a number" in text
    assert "train.progress_bar: expected true/false" in text
    assert len(problems) == 4


def test_impossible_values():
    problems = _problems(lambda: load_config(None, BASE + [
        "data.seq_len=4", "tasks.a.task_type=classification", "tasks.a.weight=-1", "tasks.b.task_type=poetry",
        "mixture.temperature=0", "train.max_steps=0"]))
    text = "\n".join(problems)
    for needle in ("data.seq_len: must be >= 8", "tasks.a.weight: must be a finite number >= 0",
                   "tasks.b.task_type: 'poetry' is not one of", "mixture.temperature: must be > 0",
                   "train.max_steps: must be >= 1"):
        assert needle in text, needle


def test_task_listed_twice_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name_or_path: /m}\ntasks:\n  a: {task_type: ner}\n  a: {task_type: ner}\n")
    (problem,) = _problems(lambda: load_config(f))
    assert problem.startswith("a: listed twice (lines 3 and 4") and str(f) in problem


def test_curriculum_phase_checks():
    problems = _problems(lambda: config_from_dict({
        "model": {"name_or_path": "/m"},
        "tasks": {"a": {"task_type": "ner"}, "b": {"task_type": "ner"}},
        "mixture": {"phases": [{"start_step": 5, "tasks": ["a", "a"]}, {"start_step": 3, "tasks": ["zzz"]}]}}))
    text = "\n".join(problems)
    assert "mixture.phases.0.start_step: the first phase must start at step 0" in text
    assert "mixture.phases.0.tasks: a task is listed twice" in text
    assert "mixture.phases.1.start_step: phases must start at increasing steps" in text
    assert "mixture.phases.1: unknown task 'zzz'" in text


def test_explicit_mixture_needs_weights():
    problems = _problems(lambda: load_config(None, BASE + ["mixture.strategy=explicit", "tasks.a.task_type=ner"]))
    assert problems == ["tasks.a.weight: required by mixture.strategy=explicit"]


def test_python_api_aliases_are_one_field():
    cfg = MultitaskConfig(model_name_or_path="/m", task_sampling_strategy="capped", loss_weighting_strategy="dwa",
                          tasks={"s": TaskConfig(task_type="classification",
                                                 inputs={"train": InputConfig(path="x.tsv")})})
    assert cfg.model.name_or_path == "/m" and cfg.model_name_or_path == "/m"
    assert cfg.mixture.strategy == "capped" and cfg.gradients.loss_weighting == "dwa"
    cfg.task_sampling_strategy = "temperature"
    assert cfg.mixture.strategy == "temperature"
    # the YAML round trip holds the nested form only
    again = config_from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="model_nme: unknown config key"):
        MultitaskConfig(model_nme="/m")


def test_model_source_checked_where_the_model_is_built():
    from megamt.model import hf_config

    cfg = MultitaskConfig()  # a pure task spec (build-shards) needs no model
    (problem,) = _problems(lambda: hf_config(cfg.model))
    assert problem.startswith("model: set name_or_path")
    assert _problems(lambda: load_config(None, ["model.from_config.hidden_size=8"])) == [
        "model.from_config.model_type: required when building from a config"]
