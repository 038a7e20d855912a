"""Data specs -> text -> token windows (llmq/data/). A fake whitespace tokenizer keeps these fast."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

import llmq
from llmq import data
from llmq.errors import BadInputError


class FakeTokenizer:
    """One id per whitespace-separated word (ids assigned in order of first appearance); never adds specials."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
        return {"input_ids": ([999_999] if add_special_tokens else []) + ids}


# ------------------------------------------------------------------------------------------------- built-in corpora


@pytest.fixture(scope="module")
def wiki() -> str:
    return data.load_text("wiki")


@pytest.fixture(scope="module")
def lambada() -> str:
    return data.load_text("lambada")


def test_wiki_is_plain_prose(wiki):
    assert len(wiki) > 1_000_000
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "<!--", "&nbsp;", "'''", "thumb|"):
        assert leftover not in wiki, leftover
    assert wiki.startswith("Anarchism is a political philosophy")  # first article, infobox/hatnotes stripped
    assert "\n\n\n" not in wiki and "\n\n" in wiki  # paragraphs kept, blank lines collapsed
    assert "\nEtymology and terminology\n" in wiki  # "== Etymology and terminology ==" -> its title
    assert "Autism is a neurodevelopmental disorder" in wiki  # second article follows
    assert data.load_text("wiki") is wiki  # cached: parsed once per process


def test_strip_wiki_markup_cases():
    raw = (
        "{{Infobox x|a={{nested|b}}|c=[[d]]}}'''Foo''' is a [[bar (thing)|bar]] in [[Baz]]s.<ref name=\"r\">cite "
        "{{cite web|url=x}}</ref> See [http://example.org the site].<ref name=r/>&nbsp;It ''is''.<!-- hidden -->\n"
        "[[File:X.jpg|thumb|A caption with [[a link]].]]\n"
        "{| class=\"wikitable\"\n|-\n| cell {{tpl}}\n|}\n\n\n\n"
        "== Section ==\n* item one\nText <small>small</small> here.\n"
        "== References ==\n{{reflist}}\n* a book\n=== Sub ===\nmore refs\n"
        "[[Category:Things]]"
    )
    assert data.strip_wiki_markup(raw) == (
        "Foo is a bar in Bazs. See the site. It is.\n\nSection\n\nitem one\nText small here."
    )


def test_lambada_is_passages_not_wiki(lambada, wiki):
    passages = lambada.split("\n\n")
    assert len(passages) > 5000 and all(p.strip() for p in passages)
    assert len(set(passages)) == len(passages)
    assert passages[0].endswith("I don't care about signs")  # context + continuation of the first request
    # No 200-char passage in common: any shared 200-char substring would contain one of wiki's aligned 100-char chunks.
    chunks = {wiki[i : i + 100] for i in range(0, len(wiki) - 99, 100)}
    assert not any(lambada[i : i + 100] in chunks for i in range(len(lambada) - 99))


def test_news_is_a_third_text_apart_from_calibration_and_evaluation(lambada, wiki):
    news = data.load_text("news")
    articles = news.split("\n\n")
    assert len(articles) == 300 and all(a.strip() == a and a for a in articles)
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")
    chunks = {news[i : i + 100] for i in range(0, len(news) - 99, 100)}  # no 200-char passage shared with either
    assert not any(text[i : i + 100] in chunks for text in (wiki, lambada) for i in range(len(text) - 99))


# ---------------------------------------------------------------------------------------------------- local files


def test_txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo world\n\nsecond paragraph\n", encoding="utf-8")
    assert data.load_text(str(path)) == "héllo world\n\nsecond paragraph\n"


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_jsonl_file(tmp_path, name):
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second doc"})]
    body = "\n".join(lines) + "\n"
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body, encoding="utf-8")
    assert data.load_text(str(path)) == "first doc\n\nsecond doc"


# ----------------------------------------------------------------------------------------------------- bad specs


def _bad(spec: str, *words: str) -> None:
    with pytest.raises(BadInputError) as err:
        data.load_text(spec)
    message = str(err.value)
    assert repr(spec) in message and "\n" not in message
    for word in words:
        assert word in message


def test_unknown_spec_lists_accepted_forms():
    _bad("wikitext", "wiki", "lambada", "news", ".txt", ".jsonl", "hf:")


def test_missing_and_empty_files(tmp_path):
    _bad(str(tmp_path / "nope.txt"), "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    _bad(str(empty), "no text")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    _bad(str(latin1), "utf-8")


def test_jsonl_line_errors_name_the_line(tmp_path):
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    _bad(str(no_text), "line 2", '"text"')
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text(json.dumps({"text": "ok"}) + "\n\n{oops\n")
    _bad(str(not_json), "line 3", "not JSON")


def test_hub_dataset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _bad("hf:wikitext:wikitext-2-raw-v1:test", "network", "pip install datasets")
    _bad("hf:wikitext", "hf:<dataset>[:<config>]:<split>")


# ------------------------------------------------------------------------------------------------------ windows


def test_tokenize_corpus_is_one_call_without_specials():
    ids = data.tokenize_corpus(FakeTokenizer(), "a b c a\n\nb d")
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 2, 0, 1, 3]


def test_eval_windows_consecutive_tail_dropped():
    ids = torch.arange(103)
    windows = data.eval_windows(ids, 10, None)
    assert windows.shape == (10, 10) and windows.dtype == ids.dtype
    assert torch.equal(windows.flatten(), ids[:100])  # consecutive from the start, tail 100..102 dropped
    assert torch.equal(data.eval_windows(ids, 10, 3), ids[:30].view(3, 10))
    assert data.eval_windows(ids, 10, 50).shape == (10, 10)  # max_windows beyond what fits: all windows
    assert data.eval_windows(ids, 103, None).shape == (1, 103)
    with pytest.raises(BadInputError, match="104"):
        data.eval_windows(ids, 104, None)


def test_calibration_windows_seeded_real_slices():
    ids = torch.randint(0, 50_000, (5_000,), generator=torch.Generator().manual_seed(123))
    a = data.calibration_windows(ids, 16, 64, seed=0)
    assert a.shape == (16, 64) and a.dtype == ids.dtype
    assert torch.equal(a, data.calibration_windows(ids, 16, 64, seed=0))
    assert not torch.equal(a, data.calibration_windows(ids, 16, 64, seed=1))
    all_windows = ids.unfold(0, 64, 1)  # every slice ids[s:s+64]
    for window in a:
        assert (all_windows == window).all(dim=1).any()
    assert data.calibration_windows(ids[:65], 3, 64, seed=0).shape == (3, 64)  # seqlen + 1 tokens is enough
    with pytest.raises(BadInputError, match="seqlen"):
        data.calibration_windows(ids[:64], 1, 64, seed=0)


CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _conversations(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_chat_template_calibration_renders_conversations(tmp_path, tiny_model_dir):
    """calibration.chat_template: the windows are drawn from the conversations rendered by the tokenizer's chat
    template (role markers and special tokens as the model sees them), tokenized as one text."""
    from transformers import AutoTokenizer

    from llmq.calibration import calibration_batches
    from llmq.recipe import CalibrationConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHAT
    convo = [{"role": "user", "content": "Is the fox quick?"}, {"role": "assistant", "content": "The fox is quick."}]
    spec = _conversations(tmp_path / "chat.jsonl", [{"messages": convo}] * 30)
    cfg = CalibrationConfig(data=spec, n_samples=3, seqlen=16, chat_template=True)
    windows = calibration_batches(cfg, tok)
    rendered = tok(tok.apply_chat_template(convo, tokenize=False) * 30, add_special_tokens=False)["input_ids"]
    assert windows.shape == (3, 16)
    for w in windows.tolist():  # every window is a slice of the rendered conversations
        assert any(rendered[i:i + 16] == w for i in range(len(rendered) - 15))
    assert tok.bos_token_id in rendered and "user:" in tok.decode(rendered[:12])


def test_chat_template_calibration_errors(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from llmq.calibration import calibration_batches
    from llmq.recipe import CalibrationConfig, Recipe

    with pytest.raises(BadInputError, match=r"chat_template: true reads conversations from a .jsonl"):
        Recipe.from_dict({"model": "m", "calibration": {"data": "lambada", "chat_template": True}})
    bad = _conversations(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(BadInputError, match='line 1 has no "messages" list'):
        data.load_conversations(bad)
    good = _conversations(tmp_path / "good.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BadInputError, match="the model's tokenizer has no chat template"):
        calibration_batches(CalibrationConfig(data=good, chat_template=True), AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(BadInputError, match='line 1 has no "messages" list'):  # llmq validate reads them before work
        llmq.validate({"model": str(tiny_model_dir), "method": "gptq", "eval": None,
                       "calibration": {"data": bad, "chat_template": True}})
