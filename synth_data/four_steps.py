"""The paper's four steps, the same for every synthetic-data pipeline.

A pipeline is one module `synth_data/<name>.py` that defines, in this order:

    class Config(pipeline.recipe.Section):      # its `generate.<name>:` recipe subsection
        count: int = 16                         # prompts to sample
        seed: int = 0
    REJECT_REASONS = ("empty", "truncated", "wrong_answer")   # the fixed code list

    def sample_prompts(cfg, rng) -> list[dict]:                     # (i) seeded, from real sources
        return [{"id": f"x{i}", "question": q} for i, q in enumerate(rng.sample(QUESTIONS, cfg.count))]

    def generate(prompts, engine, cfg) -> list[dict]:               # (ii) candidates
        sampling = Sampling(max_tokens=64, n=2)
        convs = [[{"role": "user", "content": p["question"]}] for p in prompts]
        outs = engine.chat(convs, sampling)
        return [candidate(conv, c, meta={"seed_id": p["id"], "teacher": engine.model,
                                          "sampling": asdict(sampling)})
                for p, conv, cs in zip(prompts, convs, outs) for c in cs]

    def validate(candidates, cfg) -> list[dict]:                    # (iii) filter / rank
        for c in candidates:
            c["validators"] = {"well_formed": verdict(rejected_if_malformed(c)),
                               "answer": verdict(None if ok(c) else "wrong_answer", score(c))}
            c["reject_reason"] = first_failure(c["validators"])
            c["scores"] = {...}
        return candidates

    def post_edit(candidate, cfg) -> Record:                        # (iv) fix format -> record
        messages = strip_artifacts(candidate["messages"])
        return make_record(NAME, messages, {**candidate["meta"], "post_edit": [...],
                                            "validators": candidate["validators"]})

A candidate is a dict with `messages` (the prompt turns + the teacher's answer as the
last assistant turn), optional `tools`, `meta`, `completion` (finish_reason, tokens),
and after validation `validators` (every check that ran: `{name: verdict(reason,
score)}`, the record contract's shape), `reject_reason` (the first failed
validator's code from REJECT_REASONS, or None) and `scores`. `run` calls the four
steps in order, checks that each reject reason is a failed validator's, puts the
validators in every record's `meta.validators` (accepted and rejected), turns every
rejected candidate into a record carrying its reason, and writes accepted.jsonl,
rejected.jsonl and stats.json, checking that generated = accepted + rejected.
"""

from __future__ import annotations

import importlib
import random
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from pipeline.recipe import RecipeError
from pipeline.contract import GenerateStats, Record, make_record, write_records, write_report
from pipeline.records import validation_problems

# name -> module path; imported only when that pipeline runs.
PIPELINES: dict[str, str] = {
    "tool_use": "synth_data.tool_use",
    "steerability": "synth_data.steerability",
    "table_qa": "synth_data.table_qa",
    "doc_qa": "synth_data.doc_qa",
    "needle": "synth_data.needle",
    "chat": "synth_data.chat",
}

# Codes any pipeline may use besides its own list: malformed teacher output, or a
# sample identical to one already accepted for the same prompt.
COMMON_REASONS = ("empty", "truncated", "duplicate_sample")


def load_pipeline(name: str) -> ModuleType:
    if name not in PIPELINES:
        raise RecipeError(f"unknown pipeline {name!r} (known: {', '.join(PIPELINES)})")
    return importlib.import_module(PIPELINES[name])


def validate_config(name: str, raw: dict[str, Any] | None, source: Any = "recipe") -> Any:
    """The pipeline's Config from its `generate.<name>` subsection; one RecipeError
    naming every bad key."""
    module = load_pipeline(name)
    try:
        return module.Config.model_validate(raw or {})
    except ValidationError as exc:
        problems = validation_problems(exc, prefix=f"generate.{name}")
        raise RecipeError(f"{source}:\n  " + "\n  ".join(problems)) from None


def candidate(
    messages: list[dict[str, Any]], completion: Any, meta: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A candidate: the prompt turns plus the teacher's completion as the answer."""
    return {
        "messages": [*messages, {"role": "assistant", "content": completion.text}],
        "tools": tools,
        "meta": meta,
        "completion": {"finish_reason": completion.finish_reason, "tokens": completion.tokens},
    }


def rejected_if_malformed(c: dict[str, Any]) -> str | None:
    """`empty` / `truncated` for malformed teacher output, else None."""
    text = c["messages"][-1].get("content") or ""
    if not text.strip() and not c["messages"][-1].get("tool_calls"):
        return "empty"
    if c.get("completion", {}).get("finish_reason") == "length":
        return "truncated"
    return None


def verdict(reason: str | None, score: float | None = None) -> dict[str, Any]:
    """One validator's result in the record contract's shape: failed when it gives a
    reason code; `score` (higher is better) is clipped to [0, 1]."""
    if score is not None:
        score = round(min(max(float(score), 0.0), 1.0), 4)
    return {"passed": reason is None, "score": score, "reason": reason}


def first_failure(validators: dict[str, dict[str, Any]]) -> str | None:
    """The reject reason: the first failed validator's code, in the order they ran."""
    return next((v["reason"] for v in validators.values() if not v["passed"]), None)


def _check_verdicts(name: str, c: dict[str, Any]) -> None:
    validators = c.get("validators")
    if not validators:
        raise AssertionError(f"{name}.validate left a candidate without validators")
    failed = {v["reason"] for v in validators.values() if not v["passed"]}
    if (c["reject_reason"] is None) != (not failed) or (failed and c["reject_reason"] not in failed):
        raise AssertionError(
            f"{name}: reject_reason {c['reject_reason']!r} disagrees with its validators {validators}")


def _rejected_record(name: str, c: dict[str, Any]) -> Record:
    meta = {**c.get("meta", {}), "scores": c.get("scores", {}), "validators": c["validators"]}
    return make_record(name, c["messages"], meta, c.get("tools"), reject_reason=c["reject_reason"])


def conservation_stats(accepted: list[Record], rejected: list[Record], generated: int) -> dict[str, Any]:
    """Counts per reject reason; raises if generated != accepted + rejected."""
    if generated != len(accepted) + len(rejected):
        raise AssertionError(
            f"counts not conserved: generated {generated} != accepted {len(accepted)}"
            f" + rejected {len(rejected)}"
        )
    missing = [r.id for r in rejected if not r.reject_reason]
    if missing:
        raise AssertionError(f"rejected records without reject_reason: {missing[:5]}")
    return {
        "generated": generated,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "acceptance_rate": round(len(accepted) / generated, 4) if generated else 0.0,
        "reject_reasons": dict(Counter(r.reject_reason for r in rejected).most_common()),
    }


def run(module: ModuleType, cfg: Any, engine: Any, out_dir: Path) -> dict[str, Any]:
    """Run the four steps of one pipeline and write its three files. Returns stats."""
    name = module.__name__.rsplit(".", 1)[-1]
    allowed = set(module.REJECT_REASONS) | set(COMMON_REASONS)
    started = time.monotonic()
    rng = random.Random(getattr(cfg, "seed", 0))

    prompts = module.sample_prompts(cfg, rng)  # (i)
    candidates = module.generate(prompts, engine, cfg)  # (ii)
    generated = len(candidates)
    candidates = module.validate(candidates, cfg)  # (iii)
    if len(candidates) != generated:
        raise AssertionError(f"{name}.validate returned {len(candidates)} of {generated} candidates")

    accepted, rejected, kept_ids = [], [], set()
    for c in candidates:
        if "reject_reason" not in c:
            raise AssertionError(f"{name}.validate left a candidate without reject_reason")
        _check_verdicts(name, c)
        if c["reject_reason"] is None:
            record = module.post_edit(c, cfg)  # (iv); may still reject (unfixable)
            if record.reject_reason:
                validators = {**c["validators"], "post_edit": verdict(record.reject_reason)}
                c = {**c, "reject_reason": record.reject_reason, "validators": validators}
            elif record.id in kept_ids:
                # Two samples of one prompt can come out identical; the contract wants
                # one record per id, and a second copy teaches nothing new.
                c = {**c, "reject_reason": "duplicate_sample",
                     "validators": {**c["validators"], "duplicate_sample": verdict("duplicate_sample")}}
            else:
                kept_ids.add(record.id)
                accepted.append(record)
                continue
        if c["reject_reason"] not in allowed:
            raise AssertionError(f"{name}: reject reason {c['reject_reason']!r} not in REJECT_REASONS")
        rejected.append(_rejected_record(name, c))

    stats = conservation_stats(accepted, rejected, generated)
    passed = sum(c["reject_reason"] is None for c in candidates)
    stats["steps"] = {
        "sample_prompts": len(prompts),
        "generate": generated,
        "validate_passed": passed,
        "post_edit_accepted": len(accepted),
    }
    stats["pipeline"] = name
    stats["teacher"] = {"engine": engine.name, "model": engine.model}
    stats["config"] = cfg.model_dump()
    stats["elapsed_s"] = round(time.monotonic() - started, 2)
    out_dir = Path(out_dir)
    write_records(out_dir / "accepted.jsonl", accepted)
    write_records(out_dir / "rejected.jsonl", rejected)
    write_report(out_dir / "stats.json", GenerateStats, stats)
    return stats

