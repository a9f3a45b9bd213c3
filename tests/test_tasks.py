import unicodedata

import pytest

from sabiscale.config import ConfigError, load_config
from sabiscale.prep.corpus import load_corpus
from sabiscale.tasks import BUILTIN_TASKS, BadRecord, NotApplicable, TaskDef, render, special_tokens

RESERVED = special_tokens(["yor"])


def _render(task, record, where="f:1", seed=0):
    return render(task, BUILTIN_TASKS[task], record, where, RESERVED, seed)


def test_templates_split_prompt_and_answer():
    ex = _render("translation", {"src": "Good morning", "tgt": "Ẹ káàárọ̀", "tgt_lang": "yor"})
    assert (ex.prompt, ex.answer, ex.lang) == ("<translate> Good morning <yor>", " Ẹ káàárọ̀", "yor")
    ex = _render("sentiment", {"text": "nice one", "label": "positive", "lang": "pcm"})
    assert (ex.prompt, ex.answer) == ("<classify> nice one <sentiment> :", " positive")
    ex = _render("ner", {"tokens": ["Ada", "went"], "tags": ["B-PER", "O"], "lang": "ibo"})
    assert (ex.prompt, ex.answer) == ("<NER> Ada went <tag> :", " B-PER O")


def test_sabiyarn_task_families():
    text = {"text": "Ọmọ náà lọ sí ọjà", "lang": "yor"}
    assert _render("langid", text).answer == " yor"
    diacritize = _render("diacritize", text)
    assert diacritize.prompt == "<diacritize> Omo naa lo si oja <clean>" and diacritize.answer == " Ọmọ náà lọ sí ọjà"
    with pytest.raises(NotApplicable):  # nothing to restore in text without diacritics
        _render("diacritize", {"text": "the market", "lang": "eng"})
    qa = _render("qa", {"context": "Kano is in the north.", "question": "Where is Kano?", "answer": "the north",
                        "lang": "eng"})
    assert qa.prompt == "<context> Kano is in the north. <question> Where is Kano? <answer>" and qa.answer == " the north"
    assert _render("instruction", {"prompt": "Greet", "response": "Sannu", "lang": "hau"}).prompt == "<prompt> Greet <response>"
    assert _render("headline", {"text": "Long story", "title": "Short", "lang": "eng"}).answer == " Short"
    assert _render("summarize", {"text": "Long story", "summary": "Short", "lang": "eng"}).prompt.startswith("<summarize>")


def test_descramble_shuffles_the_words_of_the_answer_the_same_way_everywhere():
    text = "one two three four five six seven"
    ex = _render("descramble", {"text": text, "lang": "eng"})
    shuffled = ex.prompt.removeprefix("<descramble> ").removesuffix(" <sentence>")
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
    assert ex.answer == " " + text
    # seeded by the record's location, so any process in any order derives the same shuffle
    assert _render("descramble", {"text": text, "lang": "eng"}) == ex
    assert _render("descramble", {"text": text, "lang": "eng"}, where="f:2").prompt != ex.prompt


def test_input_is_nfc_normalized():
    decomposed = "Ẹ ka\u0301a\u0300ro\u0323\u0300"
    ex = _render("translation", {"src": "x", "tgt": decomposed, "tgt_lang": "yor"})
    assert ex.answer == " " + unicodedata.normalize("NFC", decomposed)


@pytest.mark.parametrize("record, message", [
    ({"src": "a", "tgt": "   ", "tgt_lang": "yor"}, "field 'tgt' is empty"),
    ({"src": "a", "tgt_lang": "yor"}, "missing field"),
    ({"src": "a", "tgt": "b"}, "no language: field 'tgt_lang'"),
    ({"src": "a", "tgt": 3, "tgt_lang": "yor"}, "field 'tgt' must be a string"),
])
def test_bad_records_name_location_and_problem(record, message):
    with pytest.raises(BadRecord, match="data.jsonl:9") as err:
        render("translation", BUILTIN_TASKS["translation"], record, "data.jsonl:9", RESERVED, 0)
    assert message in str(err.value)


def test_ner_lists_must_align():
    with pytest.raises(BadRecord, match=r"must be lists of the same length, got \[2, 1\]"):
        _render("ner", {"tokens": ["Ada", "went"], "tags": ["B-PER"], "lang": "ibo"})


def test_task_definitions_are_checked_when_the_recipe_loads():
    with pytest.raises(ValueError, match=r"placeholder\(s\) \['body'\]"):
        TaskDef(prompt="<x> {body} <y>", answer=" {title}", fields=["title"])
    with pytest.raises(ValueError, match="must be function\\(field\\)"):
        TaskDef(prompt="<x> {s} <y>", answer=" {t}", fields=["t"], derive={"s": "reverse(t)"})
    with pytest.raises(ConfigError, match="neither built in .* nor declared in data.task_defs"):
        load_config(None, ["data.tasks=[poetry]"])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    _write(tmp_path / "ner" / "yor.jsonl", '{"tokens": ["A"], "tags": ["O"]}\n{not json\n')
    cfg = load_config(None, ["data.source=jsonl", f"data.jsonl_root={tmp_path}", "data.tasks=[ner]"])
    with pytest.raises(BadRecord, match=r"yor.jsonl:2: not valid JSON"):
        load_corpus(cfg, tmp_path)


def test_a_task_declared_in_the_recipe_reads_its_own_layout_folder(tmp_path):
    _write(tmp_path / "proverb" / "yor.jsonl", '{"start": "Àgbà kì í wà", "end": "kí orí ọmọ títún wọ́"}\n')
    cfg = load_config(None, ["data.source=jsonl", f"data.jsonl_root={tmp_path}", "data.tasks=[proverb]",
                             'data.task_defs={proverb: {prompt: "<proverb> {start} <finish>", answer: " {end}", '
                             'fields: [start, end]}}'])
    (example, where), = load_corpus(cfg, tmp_path).examples
    assert (example.prompt, example.answer, example.lang) == ("<proverb> Àgbà kì í wà <finish>", " kí orí ọmọ títún wọ́", "yor")
    assert where.endswith("proverb/yor.jsonl:1")


def test_tag_strings_in_user_text_stay_text(demo_cfg):
    """Web text does contain "<translate>" or "<yor>": such a record is kept, its literal tags are
    encoded as their characters (never the special id), the template's own tags as tags, and
    decoding gives the text back. Text without such strings encodes exactly as before."""
    from sabiscale.prep.tokenizer import encode_examples, load_tokenizer

    tok = load_tokenizer(demo_cfg.tokenizer_path)
    special = {tag: tok.convert_tokens_to_ids(tag) for tag in ("<translate>", "<yor>", "<classify>", "<sentiment>")}
    record = {"src": "Click <translate> to read this in <yor>", "tgt": "Tẹ <translate> láti ka èyí", "tgt_lang": "yor"}
    example = render("translation", BUILTIN_TASKS["translation"], record, "f:1", special_tokens(["yor"]), 0)
    assert example.prompt == "<translate> Click <translate> to read this in <yor> <yor>"
    assert len(example.prompt_literals) == 2 and len(example.answer_literals) == 1
    [(ids, mask)] = encode_examples(tok, [example])
    ids = [int(i) for i in ids]
    prompt_ids = ids[:int((mask == 0).sum())]
    # the template's tags: <translate> first, <yor> last; nowhere else
    assert prompt_ids[0] == special["<translate>"] and prompt_ids[-1] == special["<yor>"]
    assert prompt_ids.count(special["<translate>"]) == 1 and prompt_ids.count(special["<yor>"]) == 1
    assert special["<translate>"] not in ids[len(prompt_ids):]
    assert tok.decode(prompt_ids) == example.prompt
    assert tok.decode(ids[len(prompt_ids):], skip_special_tokens=True) == example.answer
    plain = render("sentiment", BUILTIN_TASKS["sentiment"], {"text": "I <3 <classify> it", "label": "positive", "lang": "yor"},
                   "f:2", special_tokens(["yor"]), 0)
    [(plain_ids, _)] = encode_examples(tok, [plain])
    assert [int(i) for i in plain_ids].count(special["<classify>"]) == 1
    untouched = render("sentiment", BUILTIN_TASKS["sentiment"], {"text": "I like it", "label": "positive", "lang": "yor"},
                       "f:3", special_tokens(["yor"]), 0)
    assert untouched.prompt_literals == () and encode_examples(tok, [untouched])[0][0].tolist() == (
        tok.backend_tokenizer.encode(untouched.prompt + untouched.answer, add_special_tokens=False).ids + [tok.eos_token_id])
