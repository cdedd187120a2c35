"""Popular Hugging Face causal-LM families beyond the seven tiny ones: every attention site found, the exact
rewrite equal to the original, and the paper's method decoding as it prefills (`bench/families.py` prints the
whole table)."""
import pytest

from lincompile.testing.families import check_family

POPULAR = [("gemma", "sdpa"), ("gemma3_text", "sdpa"), ("phi3", "sdpa"), ("gpt_neox", "sdpa"), ("falcon", "sdpa"),
           ("qwen3", "sdpa"), ("starcoder2", "sdpa"), ("mixtral", "sdpa"), ("deepseek_v3", "sdpa"),
           ("gpt_neo", "eager"), ("gemma2", "eager"), ("jetmoe", "sdpa"), ("gpt_oss", "eager"), ("bloom", "eager"),
           ("xglm", "eager"), ("openai-gpt", "eager"), ("opt", "sdpa")]
#: Gemma 3's layers slide over 4096 keys by default (found by the long probe), GPT-Neo's local layer over 8 here,
#: Gemma 2 alternates a 4096-key window with full attention, GPT-OSS a 128-key one.
WINDOWS = {"gemma3_text": [4096, 4096], "gpt_neo": [None, 8], "gemma2": [4096, None], "gpt_oss": [128, None]}


@pytest.mark.parametrize("family,impl", POPULAR)
def test_popular_families_linearize(family, impl):
    row = check_family(family, impl)
    assert row["sites"] == row["layers"] and row["unmatched"] == 0
    assert row["kinds"] == ["custom" if family == "bloom" else "causal+padding"]  # Bloom's ALiBi is a bias
    assert row["softmax_diff"] <= 1e-4
    assert row["decode_rel"] <= 1e-5
    assert row["windows"] == WINDOWS.get(family, [None, None])
