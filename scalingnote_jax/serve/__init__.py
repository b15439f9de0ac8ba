"""Online serving: a retriever over a bundle (retriever.py) behind an HTTP service (http.py)."""
