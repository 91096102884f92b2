"""A search engine for argilla-server that answers from its own SQL database.

argilla-server 2.x refuses to start without Elasticsearch or OpenSearch, and neither
can be installed on the machines this project targets. The server looks its engine
up by name (`SearchEngine.register`), so this module registers one called "sql":
importing it before the app starts (see review/argilla_app.py) and setting
`ARGILLA_SEARCH_ENGINE=sql` is all it takes. With a real Elasticsearch, leave the
variable at its default and nothing here is used.

The database is the index, so index operations are no-ops and every query reads the
dataset's records and filters them in Python. Limits, stated in the README too:
each search scans the whole dataset (fine for review batches of thousands, not for
millions), and text search is case-insensitive substring matching of every word
(no stemming, no relevance ranking: every hit scores 1.0).

This module runs inside the server's own virtualenv (.venv-argilla); it imports
nothing from the training stack.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, List, Optional, Union

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from argilla_server.database import AsyncSessionLocal
from argilla_server.enums import MetadataPropertyType, ResponseStatusFilter, SimilarityOrder, SortOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Record,
    Response,
    Suggestion,
    User,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

ENGINE_NAME = "sql"


@SearchEngine.register(engine_name=ENGINE_NAME)
class SQLSearchEngine(SearchEngine):
    @classmethod
    async def new_instance(cls) -> "SQLSearchEngine":
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        async with AsyncSessionLocal() as db:
            await db.execute(select(1))
        return True

    async def info(self) -> dict:
        return {"distribution": "sql", "number": "1", "note": "posttrain review.sql_search"}

    # ------------------------------------------------------------------ index ops
    # The records already live in the database; there is no separate index to keep.
    async def create_index(self, dataset: Dataset):
        pass

    async def delete_index(self, dataset: Dataset):
        pass

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        pass

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def partial_record_update(self, record: Record, **update):
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def update_record_response(self, response: Response):
        pass

    async def delete_record_response(self, response: Response):
        pass

    async def update_record_suggestion(self, suggestion: Suggestion):
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion):
        pass

    # ------------------------------------------------------------------ progress
    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = await db.execute(
                select(Record.status, func.count())
                .where(Record.dataset_id == dataset.id)
                .group_by(Record.status)
            )
            counts = {_text(status): count for status, count in rows.all()}
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = await db.execute(
                select(Response.status, func.count())
                .join(Record, Response.record_id == Record.id)
                .where(Record.dataset_id == dataset.id, Response.user_id == user.id)
                .group_by(Response.status)
            )
            counts = {_text(status): count for status, count in rows.all()}
        return {"total": sum(counts.values()), **counts}

    # -------------------------------------------------------------------- search
    async def search(
        self,
        dataset: Dataset,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        sort: Optional[List[Order]] = None,
        offset: int = 0,
        limit: int = 100,
        user_id: Optional[str] = None,
    ) -> SearchResponses:
        # Elasticsearch shuffles per user (user_id as a random seed); insertion order
        # serves reviewers as well and keeps the queue stable between page loads.
        records = await _load_records(dataset.id)
        hits = [(r, _text_score(r, query)) for r in records if _matches(r, filter)]
        hits = [(r, score) for r, score in hits if score is not None]
        for order in reversed(sort or []):
            hits = _sorted(hits, order)
        page = hits[offset : offset + limit]
        return SearchResponses(
            items=[SearchResponseItem(record_id=r.id, score=score) for r, score in page],
            total=len(hits),
        )

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: Optional[List[float]] = None,
        record: Optional[Record] = None,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: Optional[float] = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        target = value or record.vector_value_by_vector_settings(vector_settings)
        if not target:
            raise ValueError("Cannot find a vector value to apply with provided info")
        if order == SimilarityOrder.least_similar:
            target = [-x for x in target]  # as Elasticsearch does: nearest to the opposite
        excluded = record.id if record is not None else None

        hits = []
        for candidate in await _load_records(dataset.id, with_vectors=True):
            if candidate.id == excluded or not _matches(candidate, filter):
                continue
            if _text_score(candidate, query) is None:
                continue
            vector = next((v.value for v in candidate.vectors if v.vector_settings_id == vector_settings.id), None)
            if vector is None:
                continue
            # Elasticsearch's cosine score, so thresholds mean the same on both engines.
            score = (1.0 + _cosine(target, vector)) / 2.0
            if threshold is None or score >= threshold:
                hits.append(SearchResponseItem(record_id=candidate.id, score=score))
        hits.sort(key=lambda item: item.score, reverse=True)
        hits = hits[:max_results]
        return SearchResponses(items=hits, total=len(hits))

    # ------------------------------------------------------------------- metrics
    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        async with AsyncSessionLocal() as db:
            rows = await db.execute(
                select(Record.metadata_).where(Record.dataset_id == metadata_property.dataset_id)
            )
            values = []
            for (metadata,) in rows.all():
                value = (metadata or {}).get(metadata_property.name)
                if value is None:
                    continue
                values.extend(value if isinstance(value, list) else [value])

        if metadata_property.type == MetadataPropertyType.terms:
            counts: dict[str, int] = {}
            for value in values:
                counts[str(value)] = counts.get(str(value), 0) + 1
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            return TermsMetrics(
                total=len(values),
                values=[TermsMetrics.TermCount(term=term, count=count) for term, count in ranked],
            )
        numbers = [v for v in values if isinstance(v, (int, float))]
        metrics_class = (
            IntegerMetadataMetrics if metadata_property.type == MetadataPropertyType.integer else FloatMetadataMetrics
        )
        return metrics_class(min=min(numbers, default=None), max=max(numbers, default=None))


# ------------------------------------------------------------------------- helpers
async def _load_records(dataset_id, with_vectors: bool = False) -> list[Record]:
    options = [
        selectinload(Record.responses),
        selectinload(Record.suggestions).selectinload(Suggestion.question),
    ]
    if with_vectors:
        options.append(selectinload(Record.vectors))
    async with AsyncSessionLocal() as db:
        result = await db.execute(
            select(Record)
            .where(Record.dataset_id == dataset_id)
            .options(*options)
            .order_by(Record.inserted_at, Record.id)
        )
        return list(result.scalars().all())


def _text(value: Any) -> Any:
    """Enum members as their plain value; everything else unchanged."""
    return getattr(value, "value", value)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _value_matches(value: Any, filter: Filter) -> bool:
    values = [_text(v) for v in _as_list(value) if v is not None]
    if isinstance(filter, TermsFilter):
        wanted = {str(v) for v in filter.values}
        return any(str(v) in wanted for v in values)
    if isinstance(filter, RangeFilter):
        return any(
            isinstance(v, (int, float))
            and (filter.ge is None or v >= filter.ge)
            and (filter.le is None or v <= filter.le)
            for v in values
        )
    raise ValueError(f"Cannot process filter {filter}")


def _responses(record: Record, scope: ResponseFilterScope) -> list[Response]:
    if scope.user is None:
        return list(record.responses)
    return [r for r in record.responses if r.user_id == scope.user.id]


def _suggestion_value(record: Record, question: str, prop: str) -> Any:
    for suggestion in record.suggestions:
        if suggestion.question.name == question:
            return getattr(suggestion, prop, None)
    return None


def _matches(record: Record, filter: Optional[Filter]) -> bool:
    if filter is None:
        return True
    if isinstance(filter, AndFilter):
        return all(_matches(record, f) for f in filter.filters)
    scope = filter.scope
    if isinstance(scope, RecordFilterScope):
        return _value_matches(getattr(record, scope.property, None), filter)
    if isinstance(scope, MetadataFilterScope):
        return _value_matches((record.metadata_ or {}).get(scope.metadata_property), filter)
    if isinstance(scope, SuggestionFilterScope):
        return _value_matches(_suggestion_value(record, scope.question, scope.property), filter)
    if isinstance(scope, ResponseFilterScope):
        responses = _responses(record, scope)
        if scope.question:
            return any(
                _value_matches((r.values or {}).get(scope.question, {}).get("value"), filter) for r in responses
            )
        if scope.property == "status" and isinstance(filter, TermsFilter):
            # "pending" means: no response yet (from this user, when one is given).
            statuses = {str(v) for v in filter.values}
            if ResponseStatusFilter.pending.value in statuses and not responses:
                return True
            return any(_text(r.status) in statuses for r in responses)
    raise ValueError(f"Cannot process filter scope {scope}")


def _sort_value(record: Record, scope) -> Any:
    if isinstance(scope, RecordFilterScope):
        return _text(getattr(record, scope.property, None))
    if isinstance(scope, MetadataFilterScope):
        return (record.metadata_ or {}).get(scope.metadata_property)
    if isinstance(scope, SuggestionFilterScope):
        return _suggestion_value(record, scope.question, scope.property)
    if isinstance(scope, ResponseFilterScope):
        key = scope.question or scope.property
        values = []
        for response in _responses(record, scope):
            value = _text(getattr(response, key)) if key == "status" else (response.values or {}).get(key, {}).get("value")
            if isinstance(value, (int, float)):
                values.append(value)
        return sum(values) / len(values) if values else None  # Elasticsearch's mode "avg"
    raise ValueError(f"Cannot sort by scope {scope}")


def _sorted(hits: list, order: Order) -> list:
    # Records without a value go last in either direction, as in Elasticsearch.
    present = [(h, _sort_value(h[0], order.scope)) for h in hits]
    missing = [h for h, v in present if v is None]
    keyed = [(h, v) for h, v in present if v is not None]
    descending = _text(order.order) == SortOrder.desc.value
    keyed.sort(key=lambda hv: _sort_key(hv[1]), reverse=descending)
    return [h for h, _ in keyed] + missing


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, str(_as_list(value)[0]) if isinstance(value, list) and value else str(value))


def _record_text(record: Record, field: Optional[str]) -> str:
    fields = record.fields or {}
    values = [fields.get(field)] if field else list(fields.values())
    parts = []
    for value in values:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):  # chat field: [{role, content}, ...]
            parts.extend(str(m.get("content", "")) for m in value if isinstance(m, dict))
        elif isinstance(value, dict):  # custom field: a JSON object
            parts.append(json.dumps(value, ensure_ascii=False))
    return "\n".join(parts).lower()


def _text_score(record: Record, query: Optional[Union[TextQuery, str]]) -> Optional[float]:
    """1.0 when every word of the query occurs in the record (None when one does not)."""
    if query is None:
        return 1.0
    if isinstance(query, str):
        query = TextQuery(q=query)
    text = _record_text(record, query.field)
    words = query.q.lower().split()
    return 1.0 if all(word in text for word in words) else None


def _cosine(a: List[float], b: List[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
