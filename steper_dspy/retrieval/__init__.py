"""Retrieval over a passage corpus: BM25 search and the "Title | text" passage format."""

from steper_dspy.retrieval.bm25 import BM25Retriever, format_passage, passage_title

__all__ = ["BM25Retriever", "format_passage", "passage_title"]
