"""Every frozen config round-trips through JSON, rejects unknown fields and versions from a newer lincompile."""
import pytest

from lincompile.config import LinearizeConfig
from lincompile.methods.spec import get_method
from lincompile.runtime.medusa import MedusaConfig
from lincompile.train.draft_model import DistillConfig
from lincompile.train.trainer import TrainConfig

CONFIGS = [LinearizeConfig(method=get_method("augmented"), layers=(0, 2), fuel=3),
           LinearizeConfig(method="linear-elu"), get_method("retnet"), TrainConfig(lora_targets=("q_proj",)),
           MedusaConfig(hidden_size=8, vocab_size=16), DistillConfig(steps=3)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_and_unknown_fields(config):
    cls = type(config)
    assert cls.from_json(config.to_json()) == config
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=f"unknown {cls.__name__} fields \\['colour'\\]; known: "):
        cls.from_dict({**config.to_dict(), "colour": "red"})


@pytest.mark.parametrize("cls", [LinearizeConfig, TrainConfig])
def test_a_newer_version_asks_for_an_upgrade(cls):
    data = {**cls().to_dict(), "version": 99}
    with pytest.raises(ValueError, match=f"{cls.__name__} version 99 is newer than this lincompile .*upgrade"):
        cls.from_dict(data)


@pytest.mark.parametrize("field,value,error", [
    ("layers", "13", TypeError), ("layers", [1.9], TypeError), ("layers", [True], TypeError), ("layers", 3, TypeError),
    ("strict", "no", TypeError), ("fuel", 1.5, TypeError), ("fuel", True, TypeError), ("fuel", -1, ValueError),
    ("seed", "x", TypeError), ("version", "2", ValueError),
])
def test_linearize_config_values_of_the_wrong_type_are_refused(field, value, error):
    """A hand-edited lincompile.json, or a config built in Python, cannot turn "13" into sites 1 and 3 or "no" into
    strict."""
    with pytest.raises(error, match=field):
        LinearizeConfig.from_dict({**LinearizeConfig().to_dict(), field: value})


def test_numpy_integers_become_python_ones():
    import numpy as np

    config = LinearizeConfig(layers=np.arange(2), fuel=np.int64(1), seed=np.int32(3))
    assert (config.layers, config.fuel, config.seed) == ((0, 1), 1, 3) and type(config.seed) is int
    assert LinearizeConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("value", ["augmented", None, 5, [1]])
def test_a_config_that_is_no_object_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"LinearizeConfig is a JSON object of its fields, got {type(value).__name__}"):
        LinearizeConfig.from_dict(value)


def test_damaged_json_files_are_named_with_what_to_do(tmp_path):
    import lincompile
    from lincompile.jsonconfig import read_json_object
    from lincompile.testing.tiny import tiny_model

    path = tmp_path / "recipe.json"
    for text, why in (("{oops", r"Expecting property name"), ("[1, 2]", "it holds a list, not a JSON object"),
                      ("{}", r"it lacks \['linearize'\]")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"recipe.json is damaged \\({why}.*: write it again"):
            read_json_object(path, "write it again", ("linearize",))
    saved = lincompile.optimize(tiny_model("llama"), "linear-elu").save_pretrained(str(tmp_path / "saved"))
    (tmp_path / "saved" / "lincompile.json").write_text('{"linearize": ')
    with pytest.raises(ValueError, match="lincompile.json is damaged .*save the model again with save_pretrained"):
        lincompile.load(saved)
