"""MethodSpec: validation naming the field, JSON round trip, the registry and its names."""
import dataclasses

import pytest

from lincompile.methods.spec import MethodSpec, get_method, method_aliases, methods

KERNELIZED = ("elu", "relu", "performer", "cosformer", "hedgehog", "taylor")
EXPECTED = {"softmax", "linear-elu", "linear-relu", "performer", "cosformer", "hedgehog", "taylor", "retnet", "local",
            "grouped", "local+grouped", "augmented", "augmented-centered", "yoso", "castling", "square", "linformer",
            *(f"augmented-{base}" for base in KERNELIZED)}


def test_registry_names_descriptions_and_aliases():
    assert set(methods()) == EXPECTED
    for name in methods():
        spec = get_method(name)
        assert spec.name == name and spec.description and "\n" not in spec.description
    assert method_aliases() == {"flash-local": "local", "flash-grouped": "grouped"}
    assert get_method("flash-local") is get_method("local")
    with pytest.raises(ValueError, match="available"):
        get_method("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_json_round_trip(name):
    spec = get_method(name)
    assert MethodSpec.from_json(spec.to_json()) == spec
    assert MethodSpec.from_dict(spec.to_dict()) == spec


def test_augmented_is_the_papers_llama_form():
    spec = get_method("augmented")
    assert (spec.feature_map, spec.normalizer, spec.local, spec.global_branch, spec.conv) == \
        ("l2", "none", "relu2", "grouped", "causal")
    assert (spec.group_size, spec.conv_kernel, spec.decay) == (64, 63, False)
    centered = get_method("augmented-centered")
    assert centered == dataclasses.replace(spec, name=centered.name, conv="centered", description=centered.description)
    for base in KERNELIZED:
        augmented = get_method(f"augmented-{base}")
        plain = get_method("linear-" + base if base in ("elu", "relu") else base)
        assert augmented.conv == "causal" and dataclasses.replace(augmented, conv="none", name=plain.name,
                                                                  description=plain.description) == plain


def test_causality_flags():
    assert not get_method("linformer").causal_capable and not get_method("linformer").causal_safe
    assert get_method("augmented-centered").causal_capable and not get_method("augmented-centered").causal_safe
    assert all(get_method(n).causal_safe for n in methods() if n not in ("linformer", "augmented-centered"))


def test_state_parts_per_family():
    parts = {name: get_method(name).state_parts() for name in methods()}
    assert parts["softmax"] == parts["square"] == ("keys", "values", "key_mask")
    assert parts["linformer"] == ()
    assert parts["linear-elu"] == ("state", "normalizer")
    assert parts["retnet"] == ("state",)
    assert parts["cosformer"] == ("state", "normalizer", "position")
    assert parts["local"] == ("group_keys", "group_values", "position")
    assert parts["augmented"] == ("state", "group_keys", "group_values", "conv", "position")
    assert parts["castling"] == ("state", "normalizer", "conv")


def test_feature_dims():
    dims = {name: get_method(name).feature_dim(8) for name in ("linear-elu", "performer", "cosformer", "hedgehog",
                                                                 "taylor", "castling")}
    assert dims == {"linear-elu": 8, "performer": 64, "cosformer": 16, "hedgehog": 16, "taylor": 73, "castling": 9}


@pytest.mark.parametrize("field,value", [
    ("kind", "rnn"), ("feature_map", "gelu"), ("normalizer", "rms"), ("local", "relu3"), ("global_branch", "all"),
    ("conv", "mask"), ("group_size", 0), ("conv_kernel", 4), ("conv_kernel", 2.5), ("num_features", -1),
    ("horizon", True), ("decay", 1), ("description", None), ("softcap", -1.0), ("softcap", True),
    ("global_cap", -1), ("global_cap", True), ("global_cap", 512.0),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}="):
        MethodSpec(name="x", **{field: value})


@pytest.mark.parametrize("fields,named", [
    (dict(kind="softmax", feature_map="l2", global_branch="none"), "feature_map"),
    (dict(kind="projected", global_branch="inclusive"), "global_branch"),
    (dict(kind="quadratic", local="softmax", global_branch="none"), "local"),
    (dict(kind="quadratic", local="relu2", global_branch="none", feature_map="cosformer"), "feature_map"),
    (dict(global_branch="none"), "global_branch"),
    (dict(local="softmax", normalizer="denominator"), "normalizer"),
    (dict(local="yoso", feature_map="elu1"), "feature_map"),
    (dict(decay=True, global_branch="grouped"), "decay"),
    (dict(normalizer="denominator"), "normalizer"),  # identity features: weights of either sign
    (dict(normalizer="denominator", feature_map="l2", global_branch="grouped", local="relu2"), "normalizer"),
    (dict(softcap=50.0), "softcap"),
    (dict(global_cap=512), "global_cap"),  # the default global branch is inclusive
    (dict(conv="causal", conv_kernel=1), "conv_kernel"),  # a conv without past taps: no state to carry
])
def test_bad_combinations_name_the_field(fields, named):
    with pytest.raises(ValueError, match=rf"\b{named}="):
        MethodSpec(name="x", **fields)


def test_unknown_json_fields_and_empty_name():
    with pytest.raises(ValueError, match="unknown MethodSpec fields"):
        MethodSpec.from_dict({"name": "x", "colour": "red"})
    with pytest.raises(ValueError, match="name="):
        MethodSpec(name="")
