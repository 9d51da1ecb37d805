"""The service's HTTP contract: request and response models (they make the OpenAPI schema).

Every limit is part of the schema, so a request the schema allows is one the service accepts:
at most ``MAX_QUERIES`` queries per request, ``MAX_K`` results per query, ``MAX_TEXT_CHARS``
characters per text query, ``MAX_QUERY_TOKENS`` LM tokens per token query. Integers follow JSON
Schema (``3.0`` is the integer 3, ``3.5`` is refused), and no field takes a string for a number.
The limits that depend on the DB (embedding length, LM vocabulary, nprobe up to the index's list
count) are in the schema the service publishes for its DB
(``search_request_model``). The work of one request is bounded by these limits: at most
``MAX_QUERIES * MAX_K`` results, re-ranked in blocks of bounded memory.
"""


from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

MAX_QUERIES = 256
MAX_K = 100
MAX_TEXT_CHARS = 16384
MAX_QUERY_TOKENS = 1024
MAX_DIM = 4096
MAX_DELETE = 10000
MAX_REASON_CHARS = 2000
MAX_ID = (1 << 53) - 1  # the largest integer every JSON client carries exactly (ids are int64 in the DB)
MAX_TOKEN_ID = (1 << 31) - 1
QUERY_KINDS = ("texts", "token_ids", "embeddings")

def json_integer(value):
    """JSON Schema's integer: 3 and 3.0 are one; the models are strict otherwise (no "3", no true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """A JSON integer within ``bounds`` (ge, le), with the bounds in the schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(json_integer)]


Id = integer(ge=0, le=MAX_ID)
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


def vector(min_length: int, max_length: int):
    """A query vector of finite numbers, ``min_length`` to ``max_length`` of them."""
    return Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=min_length, max_length=max_length)]


def token_list(max_token_id: int):
    return Annotated[list[integer(ge=0, le=max_token_id)], Field(min_length=1, max_length=MAX_QUERY_TOKENS)]


class SearchRequest(BaseModel):
    """Exactly one of ``texts``, ``token_ids`` (LM tokens) or ``embeddings`` (frozen-BERT vectors)."""

    # "exactly one" is in the schema too (the fields are not nullable: absent is how one leaves them out)
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"oneOf": [{"required": [q]} for q in QUERY_KINDS]})

    texts: list[Text] = Field(None, min_length=1, max_length=MAX_QUERIES, description="query texts")
    token_ids: list[token_list(MAX_TOKEN_ID)] = Field(None, min_length=1, max_length=MAX_QUERIES, description="LM token ids per query")
    embeddings: list[vector(1, MAX_DIM)] = Field(None, min_length=1, max_length=MAX_QUERIES, description="query vectors, one per query")
    k: integer(ge=1, le=MAX_K) = Field(10, description="results per query")
    nprobe: integer(ge=1, le=1 << 16) | None = Field(None, description="IVF lists visited per shard (default: the DB's measured one)")
    return_tokens: bool = Field(False, description="also return the LM tokens of each chunk and continuation")

    @model_validator(mode="after")
    def one_kind_of_query(self):
        given = [name for name in QUERY_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of texts, token_ids or embeddings (got {', '.join(given) or 'none'})")
        return self


def search_request_model(*, dim: int, vocab_size: int, nlist: int) -> type[SearchRequest]:
    """``SearchRequest`` with one DB's limits in its schema: embeddings of ``dim`` values, token ids
    below ``vocab_size``, nprobe up to ``nlist``."""
    fields = SearchRequest.model_fields
    return create_model(
        "SearchRequest", __base__=SearchRequest, __doc__=SearchRequest.__doc__,
        token_ids=(list[token_list(vocab_size - 1)], Field(None, min_length=1, max_length=MAX_QUERIES, description=fields["token_ids"].description)),
        embeddings=(list[vector(dim, dim)], Field(None, min_length=1, max_length=MAX_QUERIES, description=f"query vectors of {dim} values, one per query")),
        nprobe=(integer(ge=1, le=nlist) | None, Field(None, description=f"IVF lists visited per shard, up to {nlist} (default: the DB's measured one)")),
    )


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


class DocumentsRequest(BaseModel):
    """Documents to delete from (or restore to) retrieval and training, and why (for the audit log)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    doc_ids: list[Id] = Field(min_length=1, max_length=MAX_DELETE, description="document ids")
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS, pattern=r"[^ \t\n\r\f\v]", description="why: recorded in the audit log (not blank)")


class AuditEntry(BaseModel):
    seq: int = Field(description="position in the audit log, from 1")
    time: str = Field(description="UTC, ISO 8601")
    action: Literal["delete", "restore"]
    actor: str = Field(description="the name of the token used (token:<name>), or cli:<user>@<host>")
    reason: str
    doc_ids: list[int] = Field(description="the documents named")
    documents: int = Field(description="documents this entry changed (already deleted ones are not counted again)")
    chunks: int = Field(description="their chunks")


class ChangeResponse(AuditEntry):
    total_documents_deleted: int = Field(description="documents deleted after this change")
    total_chunks_deleted: int


class DeletionsResponse(BaseModel):
    entries: list[AuditEntry] = Field(description="audit log entries after `since`, oldest first")
    total_documents_deleted: int
    total_chunks_deleted: int


class Error(BaseModel):
    detail: str | list[dict] = Field(description="what is wrong (validation errors: where and what)")


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer."""
    said = {401: "Missing or wrong bearer token", 403: "Not enabled on this deployment", 404: "Not found", 409: "Conflicts with the DB's state",
            413: "Request body too large", 422: "Validation error", 503: "A part of the service is restarting; retry"}
    return {s: {"model": Error, "description": said[s]} for s in statuses}


class Health(BaseModel):
    status: str
    vectors: int
    index_shards: int
    shard_groups: list[dict]
    deleted_chunks: int
    increments: int
