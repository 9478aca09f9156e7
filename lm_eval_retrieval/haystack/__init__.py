"""Needle-in-a-haystack documents: needles, haystack corpora, sentence splitting and the document builder.

Nothing here imports torch or transformers: the tokenizer is passed in, so lm-eval can import the task code cheaply.
"""

from lm_eval_retrieval.haystack.corpora import load_haystack_text
from lm_eval_retrieval.haystack.document import build_document
from lm_eval_retrieval.haystack.needles import Needle, get_needles
from lm_eval_retrieval.haystack.sentences import split_sentences

__all__ = ["Needle", "build_document", "get_needles", "load_haystack_text", "split_sentences"]
