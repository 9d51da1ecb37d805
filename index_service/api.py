"""The service's HTTP contract: request and response models (they make the OpenAPI schema).

Limits are part of the contract (a request beyond them gets a 422 saying which): at most
``MAX_QUERIES`` queries per request, ``MAX_K`` results per query, ``MAX_TEXT_CHARS`` characters per
text query and ``MAX_QUERY_TOKENS`` LM tokens per token query. Checks that need the DB (embedding
dimension, vocabulary, nprobe up to the index's list count) happen in the ingress.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_QUERIES = 256
MAX_K = 100
MAX_TEXT_CHARS = 16384
MAX_QUERY_TOKENS = 1024
MAX_DELETE = 10000
MAX_ID = (1 << 62) - 1  # ids are int64 throughout

Id = Annotated[int, Field(ge=0, le=MAX_ID)]
TokenId = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]


class SearchRequest(BaseModel):
    """Exactly one of ``texts``, ``token_ids`` (LM tokens) or ``embeddings`` (frozen-BERT vectors)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_QUERIES, description="query texts")
    token_ids: list[list[TokenId]] | None = Field(None, min_length=1, max_length=MAX_QUERIES, description="LM token ids per query")
    embeddings: list[list[float]] | None = Field(None, min_length=1, max_length=MAX_QUERIES, description="query vectors, one per query")
    k: int = Field(10, ge=1, le=MAX_K, description="results per query")
    nprobe: int | None = Field(None, ge=1, le=1 << 16, description="IVF lists visited per shard (default: the DB's measured one)")
    return_tokens: bool = Field(False, description="also return the LM tokens of each chunk and continuation")

    @model_validator(mode="after")
    def one_kind_of_query(self):
        given = [name for name in ("texts", "token_ids", "embeddings") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of texts, token_ids or embeddings (got {', '.join(given) or 'none'})")
        return self

    @field_validator("texts")
    @classmethod
    def texts_are_text(cls, texts):
        for i, text in enumerate(texts or []):
            if len(text) > MAX_TEXT_CHARS:
                raise ValueError(f"texts[{i}] has {len(text)} characters; at most {MAX_TEXT_CHARS}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"texts[{i}] is not valid Unicode ({e.reason} at {e.start})") from None
        return texts

    @field_validator("token_ids")
    @classmethod
    def token_lists_fit(cls, token_ids):
        for i, ids in enumerate(token_ids or []):
            if not 1 <= len(ids) <= MAX_QUERY_TOKENS:
                raise ValueError(f"token_ids[{i}] has {len(ids)} tokens; give 1 to {MAX_QUERY_TOKENS}")
        return token_ids

    @field_validator("embeddings")
    @classmethod
    def embeddings_are_finite(cls, embeddings):
        for i, vector in enumerate(embeddings or []):
            if not all(math.isfinite(x) for x in vector):
                raise ValueError(f"embeddings[{i}] holds a value that is not a finite number")
        return embeddings


class Neighbour(BaseModel):
    chunk_id: int
    doc_id: int
    distance: float = Field(description="squared L2 between the query and the chunk's embedding")
    text: str
    continuation: str = Field(description="the next chunk of the same document ('' at a document's end)")
    tokens: list[int] | None = None
    continuation_tokens: list[int] | None = None


class SearchResponse(BaseModel):
    results: list[list[Neighbour]] = Field(description="one list per query, nearest first (shorter than k when fewer chunks exist)")


class Chunk(BaseModel):
    chunk_id: int
    doc_id: int
    text: str
    tokens: list[int]
    continuation: str
    continuation_tokens: list[int]


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_ids: list[Id] = Field(min_length=1, max_length=MAX_DELETE, description="document ids whose chunks are removed")


class DeleteResponse(BaseModel):
    documents_deleted: int
    chunks_deleted: int
    total_documents_deleted: int
    total_chunks_deleted: int


class Health(BaseModel):
    status: str
    vectors: int
    index_shards: int
    shard_groups: list[dict]
    deleted_chunks: int
    increments: int
