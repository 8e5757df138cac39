"""Evaluation library: `pipeline` (EvalSettings, evaluate_split, evaluate), `retrieval` (faiss search, crops,
recalls), `local_features` (the store between extraction and re-ranking), `reranking` (DHE inlier counts),
`pictures` (one PNG per query), `report` (preds/index.html over them) and `figures` (matplotlib: recalls.png)."""
