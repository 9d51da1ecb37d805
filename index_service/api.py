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
# A prompt or an explained text: characters, so that the schema says all (byte-level BPE: at most 4
# tokens per character, so at most 16384 LM tokens, 256 windows of the tiny model to score)
MAX_PROMPT_CHARS = 4096
MAX_NEW_TOKENS = 256
MAX_GENERATE_K = 16
QUERY_KINDS = ("texts", "token_ids", "embeddings")


def json_integer(value):
    """JSON Schema's integer: 3 and 3.0 are one; the models are strict otherwise (no "3", no true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """A JSON integer within ``bounds`` (ge, le), with the bounds in the schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(json_integer)]


Id = integer(ge=0, le=MAX_ID)
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


def vector(min_length: int, max_length: int):
    """A query vector of finite numbers, ``min_length`` to ``max_length`` of them."""
    return Annotated[
        list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=min_length, max_length=max_length)
    ]


def token_list(max_token_id: int):
    return Annotated[list[integer(ge=0, le=max_token_id)], Field(min_length=1, max_length=MAX_QUERY_TOKENS)]


class SearchRequest(BaseModel):
    """Exactly one of ``texts``, ``token_ids`` (LM tokens) or ``embeddings`` (frozen-BERT vectors)."""

    # "exactly one" is in the schema too (the fields are not nullable: absent is how one leaves them out)
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [{"required": [q]} for q in QUERY_KINDS],
            "anyOf": [
                {"required": ["token_ids"]},
                {"properties": {"align": {"const": False}}},
            ],  # align needs token queries
        },
    )

    texts: list[Text] = Field(None, min_length=1, max_length=MAX_QUERIES, description="query texts")
    token_ids: list[token_list(MAX_TOKEN_ID)] = Field(
        None, min_length=1, max_length=MAX_QUERIES, description="LM token ids per query"
    )
    embeddings: list[vector(1, MAX_DIM)] = Field(
        None, min_length=1, max_length=MAX_QUERIES, description="query vectors, one per query"
    )
    k: integer(ge=1, le=MAX_K) = Field(10, description="results per query")
    nprobe: integer(ge=1, le=1 << 16) | None = Field(
        None, description="IVF lists visited per shard (default: the DB's measured one)"
    )
    return_tokens: bool = Field(False, description="also return the LM tokens of each chunk and continuation")
    align: bool = Field(
        False,
        description="token_ids queries only: each result's chunk and continuation moved along its document to line "
        "up with the query's tokens (what a RETRO model with align_neighbours reads); see Neighbour.shift",
    )

    @model_validator(mode="after")
    def one_kind_of_query(self):
        given = [name for name in QUERY_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of texts, token_ids or embeddings (got {', '.join(given) or 'none'})")
        if self.align and given != ["token_ids"]:
            raise ValueError("align lines results up with LM tokens: it needs token_ids queries")
        return self


def search_request_model(*, dim: int, vocab_size: int, nlist: int) -> type[SearchRequest]:
    """``SearchRequest`` with one DB's limits in its schema: embeddings of ``dim`` values, token ids
    below ``vocab_size``, nprobe up to ``nlist``."""
    fields = SearchRequest.model_fields
    return create_model(
        "SearchRequest",
        __base__=SearchRequest,
        __doc__=SearchRequest.__doc__,
        token_ids=(
            list[token_list(vocab_size - 1)],
            Field(None, min_length=1, max_length=MAX_QUERIES, description=fields["token_ids"].description),
        ),
        embeddings=(
            list[vector(dim, dim)],
            Field(
                None, min_length=1, max_length=MAX_QUERIES, description=f"query vectors of {dim} values, one per query"
            ),
        ),
        nprobe=(
            integer(ge=1, le=nlist) | None,
            Field(None, description=f"IVF lists visited per shard, up to {nlist} (default: the DB's measured one)"),
        ),
    )


class Neighbour(BaseModel):
    chunk_id: int
    doc_id: int
    distance: float = Field(description="squared L2 between the query and the chunk's embedding")
    text: str
    continuation: str = Field(description="the next chunk of the same document ('' at a document's end)")
    tokens: list[int] | None = None
    continuation_tokens: list[int] | None = None
    shift: int = Field(
        0,
        description="with align: tokens the window was moved along the document (negative: back); text and "
        "continuation (and tokens) are then the moved window's first and second m tokens",
    )


class SearchResponse(BaseModel):
    results: list[list[Neighbour]] = Field(
        description="one list per query, nearest first (shorter than k when fewer chunks exist)"
    )


class Chunk(BaseModel):
    chunk_id: int
    doc_id: int
    text: str
    tokens: list[int]
    continuation: str
    continuation_tokens: list[int]


class GenerateRequest(BaseModel):
    """A continuation of ``prompt`` by the served RETRO model, retrieving at every chunk boundary."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt = Field(description="the text to continue")
    max_new_tokens: integer(ge=1, le=MAX_NEW_TOKENS) = Field(
        64, description="tokens to generate (fewer if <|endoftext|> comes first)"
    )
    temperature: Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)] = Field(0.0, description="0: greedy")
    top_k: integer(ge=0, le=1 << 20) = Field(0, description="sample among the k most likely tokens (0: all)")
    seed: integer(ge=0, le=MAX_ID) = Field(0, description="the same seed gives the same text")
    retrieval: bool = Field(True, description="false: the decoder alone (no neighbours), to compare")
    k: integer(ge=1, le=MAX_GENERATE_K) | None = Field(
        None, description="neighbours per chunk (default: the k the model was trained with)"
    )
    explain: bool = Field(False, description="also return every token's log-probability with and without retrieval")


class ExplainRequest(BaseModel):
    """A text to score token by token, with its neighbours retrieved at every chunk boundary."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: Prompt = Field(description="the text to explain")
    k: integer(ge=1, le=MAX_GENERATE_K) | None = Field(
        None, description="neighbours per chunk (default: the k the model was trained with)"
    )


class Source(BaseModel):
    doc_id: int
    source: str = Field(description="the corpus file the document was read from")
    position: int = Field(description="its line (JSONL, from 1) or row (Parquet, from 0) there")
    meta: dict = Field(description="the record's metadata (for the bundled corpus: its origin and title)")


class RetrievedNeighbour(BaseModel):
    chunk_id: int
    doc_id: int
    source: Source
    distance: float = Field(description="squared L2 between the retrieving chunk's embedding and this one's")
    text: str
    continuation: str
    shift: int = Field(
        0,
        description="tokens the [chunk, continuation] window the model read was moved along the document to line up "
        "with the retrieving chunk (models with align_neighbours); text and continuation are that window's",
    )


class TextChunk(BaseModel):
    index: int = Field(description="the chunk's position in the sequence, from 0")
    start: int = Field(description="its first token (an index into tokens)")
    text: str
    neighbours: list[RetrievedNeighbour] = Field(
        description="retrieved by the chunk before this one; they condition this chunk's tokens"
    )


class TokenScore(BaseModel):
    text: str = Field(description="the text this token adds ('' for part of a character completed by a later token)")
    logprob: float | None = Field(description="natural log-probability with retrieval (null for the first token)")
    logprob_no_retrieval: float | None = Field(description="the same, the decoder alone")


class GenerateResponse(BaseModel):
    text: str = Field(description="the generated continuation")
    prompt_tokens: int
    generated_tokens: int
    chunks: list[TextChunk] = Field(description="the prompt and continuation in chunks of the model's chunk size")
    tokens: list[TokenScore] | None = Field(None, description="with explain: every token of prompt and continuation")


class ExplainResponse(BaseModel):
    tokens: list[TokenScore]
    chunks: list[TextChunk]


class ModelInfo(BaseModel):
    checkpoint: str
    step: int | None
    retrieval: bool
    chunk_size: int
    max_chunks: int
    vocab_size: int
    k: int
    n_layer: int
    n_embd: int


class Info(BaseModel):
    db: str
    chunks: int = Field(description="chunks the DB holds (every split, increments included)")
    model: ModelInfo | None = Field(description="the served model; null when the service serves the index alone")
    admin: bool = Field(
        description="whether deleting and restoring documents is enabled (an admin token is configured)"
    )


class DocumentsRequest(BaseModel):
    """Documents to delete from (or restore to) retrieval and training, and why (for the audit log)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    doc_ids: list[Id] = Field(min_length=1, max_length=MAX_DELETE, description="document ids")
    reason: str = Field(
        min_length=1,
        max_length=MAX_REASON_CHARS,
        pattern=r"[^ \t\n\r\f\v]",
        description="why: recorded in the audit log (not blank)",
    )


class AuditEntry(BaseModel):
    seq: int = Field(description="position in the audit log, from 1")
    time: str = Field(description="UTC, ISO 8601")
    action: Literal["delete", "restore"]
    actor: str = Field(description="the name of the token used (token:<name>), or cli:<user>@<host>")
    reason: str
    doc_ids: list[int] = Field(description="the documents named")
    copies: list[int] = Field(
        default=[], description="their exact copies (the same normalised text), changed with them"
    )
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
    said = {
        401: "Missing or wrong bearer token",
        403: "Not enabled on this deployment",
        404: "Not found (or no model served)",
        409: "Conflicts with the DB's state",
        413: "Request body too large",
        422: "Validation error",
        503: "A part of the service is restarting; retry",
    }
    return {s: {"model": Error, "description": said[s]} for s in statuses}


class Health(BaseModel):
    status: str
    vectors: int
    index_shards: int
    shard_groups: list[dict]
    deleted_chunks: int
    increments: int
