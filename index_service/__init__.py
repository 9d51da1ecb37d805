"""The retrieval database served as a Ray Serve application (the open index-service issue)."""
