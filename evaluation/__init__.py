"""Evaluation library: `pipeline` (EvalSettings, evaluate_split, evaluate), `retrieval` (exact search, recalls), `index`
(faiss indexes from factory strings), `sharding` (the split of images and pairs across torchrun's processes),
`saved_descriptors` (a database's descriptors saved and checked for reuse), `local_features` (the store between
extraction and re-ranking), `reranking` (DHE inlier counts), `pictures` (one PNG per query), `report`
(preds/index.html over them) and `figures` (matplotlib: recalls.png)."""
