"""The online query path: the search pipeline (detect, embed, search, vote, re-rank), category
voting, k-reciprocal re-ranking and micro-batching of model calls. Import by path
(``visearch.search.pipeline`` and so on).
"""
