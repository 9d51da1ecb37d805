"""The read side of a RETRO DB: its layout, manifest, tokens, deletions, query embedder and search.

Importable without Apache Beam or Ray: the index service, the model and users' own code read a DB
through this package; ``pipeline`` builds one.

    from retro_db.search import RetrievalIndex
    from retro_db.token_store import TokenStore
"""
