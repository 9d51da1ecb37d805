"""The build of a RETRO DB: Beam chunk stage, Ray embedding and neighbour stages, faiss index
(``python -m pipeline``)."""
