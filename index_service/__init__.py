"""The retrieval database served as a Ray Serve application (``app.build_app``) and its HTTP client."""
