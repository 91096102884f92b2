"""Steerability: document-drafting prompts carrying 1-3 instructions a program can
check (synth_data.constraints), n samples per prompt, rejection sampling by the
validators. The system-message variant gives several drafting requests that share one
instruction as a multi-turn conversation with the instruction in the system message.

(i)   sample_prompts: a document type x a topic, plus compatible constraints (seeded)
(ii)  generate: n samples per prompt; for conversations, turn by turn, continuing with
      the first sample that follows the system instruction
(iii) validate: every constraint checked on every assistant turn; among the passing
      samples of one prompt the best by the scoring hook is kept, the others are
      rejected as `not_selected` (counts stay conserved)
(iv)  post_edit: strip whitespace artifacts (validators judged the stripped text), record
      with the constraints, per-constraint results and a length bucket in meta
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Literal

from pydantic import Field

from pipeline.recipe import Section
from pipeline.contract import Record, make_record
from synth_data.constraints import CONSTRAINTS, check, describe, edit, sample_constraints, words
from pipeline.engines import Completion, Sampling, sampling_for
from synth_data.four_steps import candidate, first_failure, rejected_if_malformed, verdict

NAME = "steerability"

DOC_TYPES = [
    "an email to a colleague", "a short memo", "a product description", "a cover letter",
    "a blog post introduction", "an event announcement", "a meeting agenda", "a customer review",
    "a short story opening", "a FAQ entry", "a press release", "a thank-you note",
    "a job posting", "a recipe introduction", "a travel tip", "a museum exhibit label",
]
TOPICS = [
    "a new office coffee machine", "a community garden", "remote work", "a city bike-sharing "
    "scheme", "recycling at school", "a local library reopening", "a hiking trip", "learning "
    "to cook", "a charity run", "a software release", "a neighbourhood clean-up", "healthy "
    "sleep habits", "a science fair", "saving energy at home", "a music festival", "a new "
    "bakery", "public transport delays", "a photography workshop", "volunteering", "an art "
    "exhibition", "a team offsite", "electric cars", "a board game night", "water conservation",
]

REJECT_REASONS = (
    "empty", "truncated", "not_selected", *(f"violates_{kind}" for kind in sorted(CONSTRAINTS)),
)


class Config(Section):
    count: int = Field(16, ge=0)  # single-turn drafting prompts
    conversations: int = Field(4, ge=0)  # system-message variant: conversations
    turns: int = Field(2, ge=1, le=6)  # drafting requests per conversation
    min_constraints: int = Field(1, ge=1)
    max_constraints: int = Field(3, ge=1)
    kinds: list[str] | None = None  # restrict to these constraint kinds (None = all)
    n: int = Field(4, ge=1)  # samples per prompt (rejection sampling)
    keep_per_prompt: int = Field(1, ge=1)  # passing samples kept per prompt
    scorer: Literal["first", "concise"] = "first"  # ranks passing samples
    # Drafting requests end "Keep it short.": a 135M teacher asked for a document
    # otherwise runs past max_tokens on ~40 % of samples (rejected as truncated).
    short_drafts: bool = False
    # Drafts the teacher finished get constraints.EDITS (case, wrapping quotes, a fixed
    # opening or closing phrase) before the validators judge them; meta.format_edits
    # names what code changed. The 135M teacher almost never ends with a given phrase.
    format_edits: bool = False
    # None = the recipe's teacher.sampling value
    temperature: float | None = 0.9
    max_tokens: int | None = 200
    seed: int = 0


# Scoring hooks: higher is better. Replace or extend (e.g. a reward model) here.
SCORERS: dict[str, Callable[[dict[str, Any]], float]] = {
    "first": lambda c: -c["meta"]["sample"],
    "concise": lambda c: -len(words(c["messages"][-1]["content"])),
}


def _request(doc: str, topic: str, short: bool = False) -> str:
    return f"Write {doc} about {topic}." + (" Keep it short." if short else "")


def _user_turn(request: str, constraints: list[dict[str, Any]]) -> str:
    rules = "\n".join(f"- {describe(c['kind'], c['args'])}" for c in constraints)
    return f"{request}\n\nFollow these instructions exactly:\n{rules}"


def _system_turn(constraint: dict[str, Any]) -> str:
    return f"You are a writing assistant. In every answer: {describe(constraint['kind'], constraint['args'])}"


# ------------------------------------------------------------------------ (i)
def sample_prompts(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    unknown = sorted(set(cfg.kinds or []) - set(CONSTRAINTS))
    if unknown:
        raise ValueError(f"generate.steerability.kinds: unknown constraint kinds {unknown}")
    prompts = []
    for i in range(cfg.count):
        k = rng.randint(cfg.min_constraints, max(cfg.min_constraints, cfg.max_constraints))
        doc, topic = rng.choice(DOC_TYPES), rng.choice(TOPICS)
        prompts.append({"id": f"steer-{cfg.seed}-{i}", "variant": "single",
                        "requests": [_request(doc, topic, cfg.short_drafts)],
                        "constraints": sample_constraints(rng, k, cfg.kinds)})
    for i in range(cfg.conversations):
        shared = sample_constraints(rng, 1, cfg.kinds)
        pairs = rng.sample([(d, t) for d in DOC_TYPES for t in TOPICS], cfg.turns)
        prompts.append({"id": f"steer-sys-{cfg.seed}-{i}", "variant": "system",
                        "requests": [_request(d, t, cfg.short_drafts) for d, t in pairs], "constraints": shared})
    return prompts


# ----------------------------------------------------------------------- (ii)
def _sampling(engine, cfg: Config) -> Sampling:
    return sampling_for(engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.n, seed=cfg.seed)


def _meta(p: dict[str, Any], engine, sampling: Sampling, sample: int, edits: list[str]) -> dict[str, Any]:
    return {"seed_id": p["id"], "variant": p["variant"], "constraints": p["constraints"],
            "teacher": engine.model, "engine": engine.name,
            "sampling": dataclasses.asdict(sampling), "sample": sample,
            "answer_source": "teacher+code_edits" if edits else "teacher", "format_edits": edits}


def _edited(sample: Completion, constraints: list[dict[str, Any]], cfg: Config) -> tuple[Completion, list[str]]:
    """The sample after format_edits (never a cut-off one: it stays rejected as truncated)."""
    if not cfg.format_edits or sample.finish_reason == "length":
        return sample, []
    text, edits = edit(constraints, sample.text)
    return (dataclasses.replace(sample, text=text) if edits else sample), edits


def generate(prompts: list[dict[str, Any]], engine, cfg: Config) -> list[dict[str, Any]]:
    sampling = _sampling(engine, cfg)
    single = [p for p in prompts if p["variant"] == "single"]
    convs = [[{"role": "user", "content": _user_turn(p["requests"][0], p["constraints"])}] for p in single]
    out = []
    for p, conv, samples in zip(single, convs, engine.chat(convs, sampling)):
        for j, sample in enumerate(samples):
            sample, edits = _edited(sample, p["constraints"], cfg)
            out.append(candidate(conv, sample, _meta(p, engine, sampling, j, edits)))

    # System variant: one candidate per conversation, built turn by turn.
    system = [p for p in prompts if p["variant"] == "system"]
    threads = [[{"role": "system", "content": _system_turn(p["constraints"][0])}] for p in system]
    last: list[Any] = [None] * len(system)
    edits: list[list[str]] = [[] for _ in system]  # every turn's format edits, in order
    live = list(range(len(system)))
    for turn in range(cfg.turns):
        for i in live:
            threads[i].append({"role": "user", "content": system[i]["requests"][turn]})
        answers = engine.chat([threads[i] for i in live], sampling)
        still = []
        for i, samples in zip(live, answers):
            c = system[i]["constraints"][0]
            samples = [_edited(s, system[i]["constraints"], cfg) for s in samples]
            good = [(s, e) for s, e in samples if s.finish_reason != "length" and check(c["kind"], c["args"], s.text.strip())]
            last[i], turn_edits = (good or samples)[0]
            edits[i] += turn_edits
            threads[i].append({"role": "assistant", "content": last[i].text})
            if good:
                still.append(i)  # a turn nobody followed ends the conversation here
        live = still
    for p, thread, final, made in zip(system, threads, last, edits):
        if final is None:  # turns=0 cannot happen (Config), but keep the invariant
            continue
        out.append(candidate(thread[:-1], final, _meta(p, engine, sampling, 0, made)))
    return out


# ---------------------------------------------------------------------- (iii)
def validate(candidates: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    for c in candidates:
        answers = [m["content"].strip() for m in c["messages"] if m["role"] == "assistant"]
        passed = {con["kind"]: all(check(con["kind"], con["args"], a) for a in answers)
                  for con in c["meta"]["constraints"]}
        c["scores"] = {"passed": passed, "pass_rate": round(sum(passed.values()) / len(passed), 3),
                       "words": len(words(answers[-1]))}
        # One validator per instruction, named after its kind; the reason code names it too.
        c["validators"] = {"well_formed": verdict(rejected_if_malformed(c)),
                           **{f"constraint_{k}": verdict(None if ok else f"violates_{k}") for k, ok in passed.items()}}
        c["reject_reason"] = first_failure(c["validators"])
    # Rejection sampling: keep the best `keep_per_prompt` passing samples per prompt.
    score = SCORERS[cfg.scorer]
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        if c["reject_reason"] is None:
            by_prompt.setdefault(c["meta"]["seed_id"], []).append(c)
    for group in by_prompt.values():
        group.sort(key=score, reverse=True)
        seen = set()
        for rank, c in enumerate(group):
            text = c["messages"][-1]["content"].strip()
            selected = rank < cfg.keep_per_prompt and text not in seen
            c["validators"]["selection"] = verdict(None if selected else "not_selected")
            c["reject_reason"] = first_failure(c["validators"])
            seen.add(text)
            c["scores"]["rank"] = rank
    return candidates


# ----------------------------------------------------------------------- (iv)
def post_edit(c: dict[str, Any], cfg: Config) -> Record:
    actions = []
    messages = []
    for m in c["messages"]:
        if m["role"] == "assistant" and m["content"] != m["content"].strip():
            m = {**m, "content": m["content"].strip()}
            if "strip_whitespace" not in actions:
                actions.append("strip_whitespace")
        messages.append(m)
    n_words = c["scores"]["words"]
    bucket = "short" if n_words < 60 else "medium" if n_words < 150 else "long"
    meta = {**c["meta"], "scores": c["scores"], "post_edit": actions, "length_bucket": bucket,
            "validators": c["validators"]}
    return make_record(NAME, messages, meta)
