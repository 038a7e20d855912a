"""Text for calibration, training and perplexity: data specs → text (`corpora.py`), text → token windows
(`windows.py`)."""

from .corpora import BUILTIN_CORPORA, lambada_requests, load_conversations, load_text, strip_wiki_markup, wiki_articles
from .windows import calibration_windows, eval_windows, tokenize_corpus

__all__ = [
    "BUILTIN_CORPORA", "calibration_windows", "eval_windows", "lambada_requests", "load_conversations", "load_text", "strip_wiki_markup",
    "tokenize_corpus", "wiki_articles",
]
