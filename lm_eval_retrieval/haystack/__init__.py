"""Needle-in-a-haystack documents: needles, haystack corpora, sentence splitting and the document builder.

Nothing here imports torch or transformers: the tokenizer is passed in, so lm-eval can import the task code cheaply.
"""

from lm_eval_retrieval.haystack.corpora import load_haystack_text
from lm_eval_retrieval.haystack.document import build_document, prompt_template
from lm_eval_retrieval.haystack.languages import LANGUAGES
from lm_eval_retrieval.haystack.needles import Needle, get_needles
from lm_eval_retrieval.haystack.sentences import split_sentences

__all__ = [
    "LANGUAGES", "Needle", "build_document", "get_needles", "load_haystack_text", "prompt_template", "split_sentences"
]
