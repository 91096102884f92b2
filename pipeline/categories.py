"""A record's SFT-mix category (conversational / skill / long-context): shared ground,
because the mix draws by it and the held-out loss reports by it."""

from __future__ import annotations


def category_of(record: dict, cfg) -> str:
    """`cfg` is the recipe's `mix:` section (pipeline.recipe.MixSection)."""
    pipeline = record.get("pipeline", "")
    # Long-context pipelines give a bucket in student tokens (an int); other pipelines
    # may use words like "short" for their own length classes, which do not count.
    bucket = (record.get("meta") or {}).get("length_bucket")
    if isinstance(bucket, int) and cfg.long_context_from_buckets:
        return "long_context"
    return cfg.categories.get(pipeline, "skill")
