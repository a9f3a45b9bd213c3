import random

import pytest

from sabiscale.corpus import read_examples
from sabiscale.tasks import BadRecord, descramble, ner, sentiment, special_tokens, translation

RESERVED = special_tokens(["yor"])


def test_templates_split_prompt_and_answer():
    ex = translation({"src": "Good morning", "tgt": "Ẹ káàárọ̀", "tgt_lang": "yor"}, "f:1", RESERVED)
    assert (ex.prompt, ex.answer) == ("<translate> Good morning <yor>", " Ẹ káàárọ̀")
    ex = sentiment({"text": "nice one", "label": "positive", "lang": "pcm"}, "f:2", RESERVED)
    assert (ex.prompt, ex.answer) == ("<classify> nice one <sentiment> :", " positive")
    ex = ner({"tokens": ["Ada", "went"], "tags": ["B-PER", "O"], "lang": "ibo"}, "f:3", RESERVED)
    assert (ex.prompt, ex.answer) == ("<NER> Ada went <tag> :", " B-PER O")


def test_descramble_shuffles_the_words_of_the_answer():
    text = "one two three four five six seven"
    ex = descramble({"text": text, "lang": "eng"}, "f:1", RESERVED, random.Random(0))
    shuffled = ex.prompt.removeprefix("<descramble> ").removesuffix(" <sentence>")
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
    assert ex.answer == " " + text


def test_input_is_nfc_normalized():
    decomposed = "Ẹ ka\u0301a\u0300ro\u0323\u0300"
    ex = translation({"src": "x", "tgt": decomposed, "tgt_lang": "yor"}, "f:1", RESERVED)
    import unicodedata
    assert ex.answer == " " + unicodedata.normalize("NFC", decomposed)


@pytest.mark.parametrize("record, message", [
    ({"src": "a <yor> b", "tgt": "x", "tgt_lang": "yor"}, "contains '<yor>', which is a special token"),
    ({"src": "a", "tgt": "   ", "tgt_lang": "yor"}, "field 'tgt' is empty"),
    ({"src": "a", "tgt_lang": "yor"}, "missing field"),
])
def test_bad_records_name_location_and_problem(record, message):
    with pytest.raises(BadRecord, match="data.jsonl:9") as err:
        translation(record, "data.jsonl:9", RESERVED)
    assert message in str(err.value)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "ner").mkdir()
    (tmp_path / "ner" / "yor.jsonl").write_text('{"tokens": ["A"], "tags": ["O"]}\n{not json\n')
    with pytest.raises(BadRecord, match=r"yor.jsonl:2: not valid JSON"):
        list(read_examples(tmp_path, ["ner"], None, RESERVED, seed=0))
