"""The one module that talks to Milvus.

Every corpus has its own collection: chunk text with Milvus' built-in BM25 function, plus a
dense field when the corpus has an embedding model. Vector ids are `<document>:<chunk>` and
writes are upserts, so a batch run twice ends in the same state.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from django.conf import settings
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode
from llama_index.vector_stores.milvus import MilvusVectorStore
from llama_index.vector_stores.milvus.utils import BM25BuiltInFunction
from pymilvus import MilvusClient, MilvusException

from core import locks, metrics, tracing

logger = logging.getLogger(__name__)

# RRF needs no score calibration between BM25 and cosine, which live on unrelated scales.
HYBRID_RANKER = "RRFRanker"
HYBRID_RANKER_PARAMS = {"k": 60}
_CONNECT_TIMEOUT_S = 5.0
# pymilvus pings the server every 10 s, even with no call under way. The Milvus Lite server
# runs gRPC's defaults: pings at most every 5 minutes, and none on an idle connection; past
# two early ones it answers GOAWAY "too_many_pings" and the client logs it. Pinging only
# during calls, every 5 minutes at most, is within what Lite and standalone Milvus allow;
# a connection that died while idle is noticed by the next call, which gRPC redials.
_GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 300_000,
    "grpc.keepalive_permit_without_calls": False,
}


class VectorStoreError(Exception):
    """A vector store failure, worded for the person who asked."""


def _measured(operation: str):
    """Time a call to Milvus and count its failures (rmassimo_milvus_*)."""

    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            started = time.perf_counter()
            failed = False
            try:
                with tracing.span(
                    f"milvus {operation}", db__system="milvus", db__operation=operation
                ):
                    return function(*args, **kwargs)
            except (VectorStoreError, MilvusException):
                failed = True
                raise
            finally:
                metrics.milvus_call(operation, time.perf_counter() - started, failed=failed)

        return call

    return wrap


@dataclass(frozen=True)
class Chunk:
    document_id: int
    index: int
    text: str
    title: str
    page: int | None = None
    start: int | None = None
    end: int | None = None

    @property
    def vector_id(self) -> str:
        return f"{self.document_id}:{self.index}"


@dataclass(frozen=True)
class Hit:
    document_id: int
    chunk_index: int | None
    title: str
    page: int | None
    score: float
    text: str


class _Store(MilvusVectorStore):
    def _sparse_search(self, query, string_expr, output_fields, **kwargs):
        # The stock method asks for drop_ratio_search=0.2, which Milvus rejects for BM25
        # fields built by its own function ("only drop_ratio_search=0 is supported").
        res = self.client.search(
            collection_name=self.collection_name,
            data=[query.query_str],
            anns_field=self.sparse_embedding_field,
            limit=query.similarity_top_k,
            filter=string_expr,
            output_fields=output_fields,
            search_params={"params": {"drop_ratio_search": 0.0}},
        )
        return self._parse_from_milvus_results(res)


_lock = threading.Lock()
_stores: dict[tuple[str, str, int | None], _Store] = {}
_clients: dict[str, MilvusClient] = {}


def collection_name(corpus_id: int) -> str:
    return f"rmassimo_corpus_{corpus_id}"


def _unreachable(exc: Exception) -> VectorStoreError:
    return VectorStoreError(
        f"The vector store at {settings.MILVUS_URI} could not be reached or refused the "
        f"request ({_short(exc)})."
    )


def _short(exc: Exception) -> str:
    if isinstance(exc, MilvusException):
        return str(exc.message)[:200]
    return str(exc)[:200] or type(exc).__name__


def _client() -> MilvusClient:
    # A store object would create a collection; a bare client is enough to list and count.
    with _lock:
        client = _clients.get(settings.MILVUS_URI)
        if client is None:
            try:
                client = MilvusClient(
                    uri=settings.MILVUS_URI,
                    token=settings.MILVUS_TOKEN,
                    timeout=_CONNECT_TIMEOUT_S,
                    grpc_options=dict(_GRPC_OPTIONS),
                )
            except MilvusException as exc:
                raise _unreachable(exc) from exc
            _clients[settings.MILVUS_URI] = client
    return client


def _collection_dim(client: MilvusClient, name: str) -> int | None:
    for field in client.describe_collection(name)["fields"]:
        if field["name"] == "embedding":
            return int(field["params"]["dim"])
    return None


_SHAPE_TTL_S = 30.0
_shapes: dict[tuple[str, str], tuple[float, bool, int | None]] = {}


def _shape(client: MilvusClient, name: str) -> tuple[bool, int | None]:
    """(exists, dense dim) of a collection, remembered briefly: asking Milvus twice per
    question costs more than the search itself on Milvus Lite."""
    key = (settings.MILVUS_URI, name)
    cached = _shapes.get(key)
    if cached and time.monotonic() - cached[0] < _SHAPE_TTL_S:
        return cached[1], cached[2]
    exists = client.has_collection(name)
    dim = _collection_dim(client, name) if exists else None
    if exists:
        _shapes[key] = (time.monotonic(), exists, dim)
    return exists, dim


def store(corpus_id: int, *, dim: int | None) -> _Store:
    """The corpus' store; creates the collection with a dense field of `dim` if missing.

    `dim=None` asks for BM25 alone. An existing collection keeps the shape it was built with.
    """
    name = collection_name(corpus_id)
    key = (settings.MILVUS_URI, name, dim)
    with _lock:
        cached = _stores.get(key)
    if cached is not None:
        return cached
    try:
        if _client().has_collection(name):
            built = _open(name, dim)
        else:
            # Two workers (two prepare groups of one corpus) that both see no collection
            # would both create it: one fails ("already exists", a second index) or builds
            # another shape. Whoever comes second finds it made and opens it as it is.
            with locks.held(f"milvus-create:{settings.MILVUS_URI}:{name}"):
                built = _open(name, dim)
    except MilvusException as exc:
        raise _unreachable(exc) from exc
    with _lock:
        _stores[key] = built
    return built


def _open(name: str, dim: int | None) -> _Store:
    client = _client()
    if client.has_collection(name):
        existing_dim = _collection_dim(client, name)
        if dim is not None and existing_dim not in (None, dim):
            raise VectorStoreError(
                f"The corpus index was built with {existing_dim}-dimensional embeddings "
                f"but the embedding model now gives {dim}; re-ingest the corpus."
            )
        dim = existing_dim
    built = _Store(
        uri=settings.MILVUS_URI,
        token=settings.MILVUS_TOKEN,
        collection_name=name,
        dim=dim,
        enable_dense=dim is not None,
        enable_sparse=True,
        sparse_embedding_function=BM25BuiltInFunction(),
        similarity_metric="IP",
        upsert_mode=True,
        use_async_client=False,
        hybrid_ranker=HYBRID_RANKER,
        hybrid_ranker_params=dict(HYBRID_RANKER_PARAMS),
        index_config={"index_type": "AUTOINDEX"},
        timeout=_CONNECT_TIMEOUT_S,
        grpc_options=dict(_GRPC_OPTIONS),
    )
    built.client.load_collection(name)
    return built


def bm25_only(corpus_id: int) -> bool:
    """True when the corpus' collection exists without a dense field: it keeps that shape
    whatever is ingested into it later."""
    try:
        exists, dim = _shape(_client(), collection_name(corpus_id))
    except MilvusException as exc:
        raise _unreachable(exc) from exc
    return exists and dim is None


@_measured("has_dense")
def has_dense(corpus_id: int) -> bool:
    try:
        client = _client()
        exists, dim = _shape(client, collection_name(corpus_id))
        return exists and dim is not None
    except MilvusException as exc:
        raise _unreachable(exc) from exc


@_measured("upsert")
def upsert_chunks(
    corpus_id: int, chunks: list[Chunk], embeddings: list[list[float]] | None
) -> None:
    if not chunks:
        return
    dim = len(embeddings[0]) if embeddings else None
    target = store(corpus_id, dim=dim)
    nodes = []
    for position, chunk in enumerate(chunks):
        node = TextNode(
            id_=chunk.vector_id,
            text=chunk.text,
            embedding=embeddings[position] if embeddings and target.enable_dense else None,
            metadata={
                "document_id": chunk.document_id,
                "chunk": chunk.index,
                "title": chunk.title,
                "page": chunk.page,
                "start": chunk.start,
                "end": chunk.end,
            },
            excluded_embed_metadata_keys=["document_id", "chunk", "page", "start", "end"],
        )
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(
            node_id=str(chunk.document_id)
        )
        nodes.append(node)
    if target.enable_dense and not embeddings:
        raise VectorStoreError(
            "This corpus was indexed with an embedding model that did not answer; "
            "try again when it is reachable."
        )
    try:
        target.add(nodes)
    except MilvusException as exc:
        raise _unreachable(exc) from exc


@_measured("flush")
def flush(corpus_id: int) -> None:
    """Seal what was written so that it is searched through the indexes.

    Milvus Lite searches rows it has not flushed by scanning them in Python: at 10,000
    chunks a hybrid query took 1.5 s before a flush and 20 ms after.
    """
    client = _client()
    name = collection_name(corpus_id)
    try:
        if client.has_collection(name):
            client.flush(name)
    except MilvusException as exc:
        raise _unreachable(exc) from exc


@_measured("delete")
def delete_document(corpus_id: int, document_id: int, *, from_chunk: int | None = None) -> None:
    """Delete a document's vectors; with `from_chunk`, only its chunks from that index on."""
    client = _client()
    name = collection_name(corpus_id)
    expr = f'doc_id == "{int(document_id)}"'
    if from_chunk is not None:
        expr += f" and chunk >= {int(from_chunk)}"
    try:
        if client.has_collection(name):
            client.delete(name, filter=expr)
    except MilvusException as exc:
        raise _unreachable(exc) from exc


@_measured("count")
def count(corpus_id: int, *, document_id: int | None = None) -> int:
    client = _client()
    name = collection_name(corpus_id)
    try:
        if not client.has_collection(name):
            return 0
        expr = f'doc_id == "{int(document_id)}"' if document_id is not None else ""
        rows = client.query(name, filter=expr, output_fields=["count(*)"])
    except MilvusException as exc:
        raise _unreachable(exc) from exc
    return int(rows[0]["count(*)"]) if rows else 0


def rows(corpus_id: int, *, batch: int = 1000) -> Iterator[tuple[str, str, list[float] | None]]:
    """Every row of the corpus' collection as (vector id, text, dense vector or None), for
    backups; nothing when the collection does not exist."""
    client = _client()
    name = collection_name(corpus_id)
    try:
        if not client.has_collection(name):
            return
        dense = _collection_dim(client, name) is not None
        client.load_collection(name)
        pages = client.query_iterator(
            name,
            batch_size=batch,
            filter="",
            output_fields=["id", "text", *(["embedding"] if dense else [])],
        )
        while page := pages.next():
            for row in page:
                vector = row.get("embedding") if dense else None
                yield row["id"], row["text"], [float(x) for x in vector] if vector else None
        pages.close()
    except MilvusException as exc:
        raise _unreachable(exc) from exc


@_measured("drop")
def drop_corpus(corpus_id: int) -> None:
    client = _client()
    name = collection_name(corpus_id)
    try:
        if client.has_collection(name):
            client.drop_collection(name)
    except MilvusException as exc:
        raise _unreachable(exc) from exc
    with _lock:
        for key in [k for k in _stores if k[1] == name]:
            del _stores[key]
        _shapes.pop((settings.MILVUS_URI, name), None)


@_measured("search")
def search(
    corpus_id: int,
    *,
    text: str,
    embedding: list[float] | None,
    top_k: int,
    mode: str = "auto",
) -> list[Hit]:
    """Hybrid (dense + BM25, fused by RRF) when both exist, else BM25 alone.

    `mode` "dense" or "bm25" asks for one side only (benchmarks compare them).
    """
    client = _client()
    name = collection_name(corpus_id)
    try:
        exists, dim = _shape(client, name)
        if not exists:
            return []
        target = store(corpus_id, dim=dim)
        if mode == "dense" and dim is not None and embedding is not None:
            query_mode = VectorStoreQueryMode.DEFAULT
        elif mode != "bm25" and dim is not None and embedding is not None:
            query_mode = VectorStoreQueryMode.HYBRID
        else:
            query_mode = VectorStoreQueryMode.TEXT_SEARCH
        result = target.query(
            VectorStoreQuery(
                query_str=text,
                query_embedding=embedding,
                similarity_top_k=top_k,
                mode=query_mode,
            )
        )
    except MilvusException as exc:
        raise _unreachable(exc) from exc
    hits = []
    for node, score in zip(result.nodes, result.similarities or [], strict=False):
        meta = node.metadata
        hits.append(
            Hit(
                document_id=int(meta.get("document_id") or node.ref_doc_id or 0),
                chunk_index=meta.get("chunk"),
                title=str(meta.get("title") or ""),
                page=meta.get("page"),
                # Milvus Lite reports BM25 relevance negated (smaller is nearer); a dense
                # similarity keeps its sign (the "I don't know" threshold compares it).
                score=round(
                    abs(float(score))
                    if query_mode == VectorStoreQueryMode.TEXT_SEARCH
                    else float(score),
                    6,
                ),
                text=node.get_content(),
            )
        )
    return hits
