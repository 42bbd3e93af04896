"""Embedding index and search: `msclip index` / `msclip search` (docs/search.md).

store.py: the index folder (FAISS + the table of rows, incremental updates, model identity);
search.py: query embedding, nearest neighbours, the recall of the stored captions;
gallery.py: the HTML gallery (also `msclip retrieval --html`)."""
