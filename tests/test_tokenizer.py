import pytest
import unicodedata

from transformers import AutoTokenizer

from sabiscale.tasks import BUILTIN_TASKS, EOS, Example, special_tokens
from sabiscale.prep.tokenizer import encode_examples, load_tokenizer


def test_tags_are_single_special_tokens(demo_cfg):
    tok = load_tokenizer(demo_cfg.tokenizer_path)
    for tag in special_tokens(["yor", "hau", "ibo"], [BUILTIN_TASKS[t] for t in demo_cfg.data.tasks]):
        ids = tok.backend_tokenizer.encode(tag, add_special_tokens=False).ids
        assert len(ids) == 1, tag
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS


def test_nfc_normalization_and_roundtrip(demo_cfg):
    tok = load_tokenizer(demo_cfg.tokenizer_path)
    nfc = "Ọmọ náà ń ṣeré ní Ìbàdàn"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    assert tok.encode(nfd, add_special_tokens=False) == tok.encode(nfc, add_special_tokens=False)
    assert tok.decode(tok.encode(nfc, add_special_tokens=False)) == nfc


def test_mask_boundary_equals_joint_encoding(demo_cfg):
    tok = load_tokenizer(demo_cfg.tokenizer_path)
    ex = Example("translation", "yor", "<translate> the big house <yor>", " ilé ńlá náà", "t:1")
    [(ids, mask)] = encode_examples(tok, [ex])
    joint = tok.encode(ex.prompt + ex.answer + EOS, add_special_tokens=False)
    assert ids.tolist() == joint
    n_prompt = len(tok.encode(ex.prompt, add_special_tokens=False))
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()
    assert tok.decode(ids[mask.astype(bool)].tolist()) == ex.answer + EOS


def test_transformers_loads_the_saved_directory_offline(demo_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(str(demo_cfg.tokenizer_path.parent))
    ours = load_tokenizer(demo_cfg.tokenizer_path)
    text = "<classify> kò dára <sentiment> : negative"
    assert auto.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert auto.eos_token == EOS


def test_report_counts_fertility_bytes_and_byte_fallback(demo_cfg):
    from sabiscale.prep.tokenizer_report import tokenizer_report

    tok = load_tokenizer(demo_cfg.tokenizer_path)
    # the demo tokenizer has never seen Devanagari: each character falls back to 3 lone bytes
    unseen = "नमस्ते"
    examples = [Example("text", "yor", "<yor>", " ọmọ ọmọ", "t:1"), Example("text", "xx", "<xx>", " " + unseen, "t:2")]
    report = tokenizer_report(tok, examples)
    ids = tok.encode("ọmọ ọmọ", add_special_tokens=False)
    assert report["yor"]["tokens"] == len(ids) and report["yor"]["words"] == 2
    assert report["yor"]["fertility"] == len(ids) / 2
    assert report["yor"]["bytes_per_token"] == len("ọmọ ọmọ".encode()) / len(ids)
    assert report["yor"]["byte_fallback_share"] == 0.0
    assert report["xx"]["byte_fallback_share"] > 0.5
    # what each data.mix.unit would make of the same two examples: Devanagari costs many tokens per
    # byte here, so counted in tokens "xx" looks bigger than counted in bytes or words
    from sabiscale.prep.tokenizer_report import format_unit_shares, unit_shares

    shares = unit_shares(tok, examples, 2.0, {})
    assert shares["xx"]["natural_tokens"] > shares["xx"]["natural_bytes"] and shares["xx"]["natural_words"] == pytest.approx(2 / 5)  # "<xx> नमस्ते" against "<yor> ọmọ ọmọ"
    assert sum(s["mixed_bytes"] for s in shares.values()) == pytest.approx(1.0)
    assert "| xx |" in format_unit_shares(shares, 2.0)
