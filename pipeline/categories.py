"""A record's SFT-mix category (conversational / skill / long-context): shared ground,
because the mix draws by it and the held-out loss reports by it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.contract import Conversation, Record


def category_of(record: Record | Conversation, cfg) -> str:
    """`cfg` is the recipe's `mix:` section (pipeline.recipe.MixSection)."""
    pipeline = record.pipeline or ""
    # Long-context pipelines give a bucket in student tokens (an int); other pipelines
    # may use words like "short" for their own length classes, which do not count.
    bucket = record.meta.length_bucket if record.meta else None
    if isinstance(bucket, int) and cfg.long_context_from_buckets:
        return "long_context"
    return cfg.categories.get(pipeline, "skill")
