from pathlib import Path

import pytest

from sabiscale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("recipe", sorted((ROOT / "launch/recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.name
    assert cfg.engine.ds_config == "auto" or (ROOT / cfg.engine.ds_config).is_file()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.max_steps=70", "optim.lr=1e-4", "data.tasks=[ner, text]", "loss.kind=clm"])
    assert cfg.train.max_steps == 70 and cfg.optim.lr == 1e-4
    assert cfg.data.tasks == ["ner", "text"] and cfg.loss.kind == "clm"


def test_all_problems_are_reported_at_once(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  hidden_sise: 64\ntrain:\n  max_steps: -1\noptim:\n  lr: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["loss.kind=sideways"])
    text = str(err.value)
    assert str(recipe) in text
    for fragment in ("model.hidden_sise", "unknown key", "train.max_steps", "optim.lr", "loss.kind"):
        assert fragment in text, fragment
    assert "4 problem(s)" in text or "5 problem(s)" in text


def test_impossible_model_shape_is_explained():
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        load_config(None, ["model.hidden_size=100", "model.num_heads=3"])


def test_bad_yaml_and_missing_recipe_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_global_batch_size_derives_accumulation_or_says_what_divides():
    from sabiscale.config import resolve_batch

    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=24"])
    assert resolve_batch(cfg, 1).train.grad_accum_steps == 6
    assert resolve_batch(cfg, 2).train.grad_accum_steps == 3
    assert resolve_batch(cfg, 6).train.grad_accum_steps == 1
    with pytest.raises(ConfigError) as err:
        resolve_batch(cfg, 4)  # 24 sequences cannot be split into 4 ranks x 4
    assert "4 ranks = 16" in str(err.value) and "[1, 2, 3, 6]" in str(err.value)
    contradicting = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=24", "train.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_batch(contradicting, 1)
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=10"])


def test_a_key_given_twice_in_a_recipe_is_refused_naming_both_lines(tmp_path):
    from sabiscale.config import ConfigError, load_config

    recipe = tmp_path / "twice.yaml"
    recipe.write_text("data:\n  source: files\n  files: []\ntrain:\n  max_steps: 3\ndata:\n  source: demo\n")
    with pytest.raises(ConfigError, match=r"key 'data' appears twice in one mapping \(lines 1 and 6\)"):
        load_config(recipe)


@pytest.mark.parametrize("overrides, message", [
    (["data.val_fraction=0"], r"data.val_fraction is 0, but training evaluates on the validation split"),
    (["data.languages=[yor, hau]", "data.mix.language_weights={yo: 2}"],
     r"names language\(s\) not in data.languages: 'yo' \(did you mean 'yor'\?\)"),
    (["data.languages=[yor, hau]", "data.mix.language_weights={yor: 0, hau: 0}"], r"gives every language .* weight 0"),
])
def test_settings_that_cannot_train_are_refused_when_the_config_is_read(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
