"""Speed benchmarks: the project's trainer and retriever against the usual baselines, in one run each.

`steper speed training` compares `train_student` with TRL's `SFTTrainer`; `steper speed retrieval` compares
the bm25s-based `BM25Retriever` with rank_bm25. Every figure is printed next to the baseline's figure from
the same run, with their ratio, and written to `results.json` with a bar plot beside it.
"""
