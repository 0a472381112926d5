"""The machine's settings ([runtime]: device, precision, workers, bad_images, feature_cache) apart
from the recipe: configs and run folders written when they lived in [training] still load, and a
model file records the recipe without them."""

import json

import pytest

import mvit
from mvit.errors import ConfigError
from mvit.train import trainer as training
from mvit.train.config import load_config, validate_config
from mvit.train.run_folder import open_run
from training_data import make_learnable_dermmel, tiny_run_config


def _config(folder, body: str):
    path = folder / "c.toml"
    path.write_text(f'output = "out"\n[[datasets]]\nname = "dermmel"\nroot = "data"\n{body}')
    return path


def test_a_config_written_with_the_machine_settings_in_training_still_loads(tmp_path):
    path = _config(tmp_path, '[training]\nepochs = 3\ndevice = "cpu"\nworkers = 0\nbad_images = "skip"\n'
                             'feature_cache = "cache/f.h5"\nprecision = "fp32"\n')
    config = load_config(path)
    assert (config.runtime.device, config.runtime.workers, config.runtime.bad_images, config.runtime.precision) == \
        ("cpu", 0, "skip", "fp32")
    assert config.runtime.feature_cache == tmp_path / "cache" / "f.h5"  # relative to the config, as before
    assert config.training.epochs == 3 and not hasattr(config.training, "device")


def test_the_new_section_loads_and_an_old_spelling_on_the_command_line_overrides_it(tmp_path):
    path = _config(tmp_path, '[runtime]\ndevice = "cpu"\nworkers = 2\n')
    assert load_config(path).runtime.workers == 2
    assert load_config(path, ["training.workers=1"]).runtime.workers == 1  # habit: still the same setting
    assert load_config(path, ["runtime.workers=3"]).runtime.workers == 3


def test_a_setting_in_both_places_is_one_sentence(tmp_path):
    path = _config(tmp_path, '[training]\nworkers = 1\n[runtime]\nworkers = 2\n')
    with pytest.raises(ConfigError, match=r"workers is set both in \[training\] and in \[runtime\].*remove training.workers"):
        load_config(path)


def test_an_error_in_an_old_spelling_names_the_field_as_written(tmp_path):
    with pytest.raises(ConfigError, match=r"c.toml: training.device: 'tpu' is not a device"):
        load_config(_config(tmp_path, '[training]\ndevice = "tpu"\n'))
    with pytest.raises(ConfigError, match=r"c.toml: runtime.device: 'tpu' is not a device"):
        load_config(_config(tmp_path, '[runtime]\ndevice = "tpu"\n'))


def test_a_run_folder_started_before_the_runtime_section_resumes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = {"output": str(run), "datasets": [{"name": "dermmel", "root": str(tmp_path / "data")}],
           "training": {"epochs": 2, "device": "cpu", "workers": 0, "feature_cache": str(run / "features.h5")}}
    (run / "config.json").write_text(json.dumps(old))
    moved = tmp_path / "moved"
    run.rename(moved)
    config = open_run(moved)  # what --resume reads
    assert config.runtime.device == "cpu" and config.runtime.workers == 0
    assert config.runtime.feature_cache == moved / "features.h5"  # the cache inside the folder moved with it


def test_the_model_file_records_the_recipe_but_not_the_machine(tmp_path):
    root = make_learnable_dermmel(tmp_path / "data", per_class_train=4, per_class_eval=2)
    config = tiny_run_config(root, tmp_path / "run", {"runtime": {"bad_images": "skip"}})
    recipe = mvit.load(training.train(config)).provenance["training"][-1]["config"]
    assert "runtime" not in recipe and "device" not in recipe["training"]
    assert recipe["training"]["epochs"] == config.training.epochs
    assert json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]["bad_images"] == "skip"  # resume needs it
    assert validate_config(json.loads((tmp_path / "run" / "config.json").read_text())).runtime.bad_images == "skip"


@pytest.mark.parametrize("section, key, value", [
    ("training", "early_stopping", 10), ("optimizer", "grad_clip", 1.0), ("training", "ema_decay", 0.99)])
def test_every_switch_is_turned_off_by_false(tmp_path, section, key, value):
    assert getattr(getattr(load_config(_config(tmp_path, f"[{section}]\n{key} = {value}\n")), section), key) == value
    off = load_config(_config(tmp_path, f"[{section}]\n{key} = false\n"))
    assert getattr(getattr(off, section), key) is None
    assert getattr(getattr(load_config(_config(tmp_path, ""), [f"{section}.{key}=false"]), section), key) is None
    with pytest.raises(ConfigError, match=f"{section}.{key}: true is not a value for this setting: give a number, or false"):
        load_config(_config(tmp_path, f"[{section}]\n{key} = true\n"))
    assert validate_config(json.loads(off.model_dump_json())) == off  # a run folder's config.json says off as null


def test_an_ema_decay_of_zero_from_an_older_config_is_still_off(tmp_path):
    from mvit.train.averaging import make_ema
    config = load_config(_config(tmp_path, "[training]\nema_decay = 0\n"))
    assert make_ema(None, config.training.ema_decay) is None
