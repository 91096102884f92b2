"""General conversation: keeps the student conversational while other pipelines add
skills. Seed instructions are a modest shipped list plus requests derived from real
text (summarise a Lee news article, explain a Python reference topic).

(i)   sample_prompts: seeded draw from the seed instructions
(ii)  generate: the teacher answers, n samples per instruction
(iii) validate: reject empty, truncated, degenerate repetition, too short, role/template
      leaks, answers that only echo the instruction, and (requests over real text)
      answers with numbers the text does not hold
(iv)  post_edit: strip whitespace and a leading "Assistant:" label; record
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from typing import Any

from pydantic import Field

from pipeline.recipe import Section
from pipeline.contract import Record, make_record
from pipeline import sources
from pipeline.engines import sampling_for
from synth_data.four_steps import candidate, first_failure, rejected_if_malformed, verdict

NAME = "chat"
REJECT_REASONS = (
    "empty", "truncated", "degenerate_repetition", "too_short", "role_leak", "echo", "invented_number",
)

# Hand-written, varied everyday requests (the shipped seed list).
SEED_INSTRUCTIONS = (
    "Give me three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Write a short, friendly message inviting a neighbour to a barbecue.",
    "Explain what a budget is to a ten-year-old.",
    "How do I boil an egg so that the yolk stays soft?",
    "Suggest a name for a small bakery that sells bread and cakes.",
    "Why is the sky blue? Answer in two sentences.",
    "What are some good habits for a healthy morning routine?",
    "Write a haiku about autumn leaves.",
    "How can I politely decline an invitation to a party?",
    "Explain the water cycle in simple words.",
    "What should I pack for a weekend hiking trip?",
    "Give me a simple recipe for a vegetable soup.",
    "What is photosynthesis?",
    "Write two sentences describing a rainy day in a city.",
    "How do I start learning to play the guitar?",
    "What is the capital of Japan, and what is it known for?",
    "Explain why exercise is good for the heart.",
    "Write a thank-you note to a teacher.",
    "What are the planets of the solar system?",
    "How can I save money on groceries?",
    "Describe a cat to someone who has never seen one.",
    "What is a good way to remember new vocabulary words?",
    "Write a short story opening about a lighthouse keeper.",
    "What is the difference between a virus and a bacterium?",
    "How do I write a good email subject line?",
    "Give me three ideas for a rainy afternoon at home.",
    "Why do leaves change colour in autumn?",
    "What does a librarian do?",
    "Explain what recycling is and why it matters.",
    "How can I fall asleep faster?",
    "Summarise the story of Little Red Riding Hood in three sentences.",
    "What is a volcano?",
    "Write a short motivational message for someone starting a new job.",
    "How do bees make honey?",
    "What are the benefits of reading books?",
    "Explain what a computer program is.",
    "Give me a packing list for a beach holiday.",
    "What is the tallest mountain in the world?",
    "How should I prepare for a job interview?",
)

DERIVED = {
    "lee": "Summarise this news report in two sentences.\n\n{text}",
    "pydoc": "Explain in plain words what this part of the Python documentation says.\n\n{text}",
}


class Config(Section):
    count: int = Field(16, ge=0)
    # Where instructions come from: the shipped list and/or requests over real text.
    seeds: list[str] = Field(default_factory=lambda: ["builtin", "lee", "pydoc"])
    n: int = Field(1, ge=1)  # samples per instruction
    temperature: float = 0.7
    max_tokens: int = Field(256, gt=0)
    min_words: int = Field(3, ge=1)
    # Share of repeated word 4-grams above which an answer is degenerate.
    max_repetition: float = Field(0.3, gt=0, le=1)
    seed: int = 0


# ------------------------------------------------------------------ text checks
# Shared with table_qa / doc_qa: generic checks on teacher text.
ROLE_LEAK = re.compile(r"<\|im_(start|end)\|>|^\s*(user|system|human)\s*:", re.IGNORECASE | re.MULTILINE)


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def repetition(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, ->1 = loops)."""
    toks = words(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if len(grams) < 4:
        return 0.0
    counts = Counter(grams)
    return round(sum(c - 1 for c in counts.values()) / len(grams), 4)


def repeated_lines(text: str) -> int:
    """Most times one non-trivial line occurs (a looping model repeats whole lines)."""
    lines = [line.strip().lower() for line in text.splitlines() if len(line.strip()) > 15]
    return max(Counter(lines).values(), default=0)


def strip_label(text: str) -> tuple[str, list[str]]:
    """Strip whitespace and a leading 'Assistant:'/'Answer:' label; returns actions."""
    actions = []
    stripped = text.strip()
    if stripped != text:
        actions.append("strip_whitespace")
    label = re.match(r"(assistant|answer)\s*:\s*", stripped, re.IGNORECASE)
    if label:
        stripped = stripped[label.end() :]
        actions.append("strip_role_label")
    return stripped, actions


# ------------------------------------------------------------------ the 4 steps
def seed_instructions(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    pool: list[dict[str, Any]] = []
    unknown = [s for s in cfg.seeds if s not in ("builtin", *DERIVED)]
    if unknown:
        raise ValueError(f"chat.seeds: unknown source(s) {unknown} (known: builtin, lee, pydoc)")
    if "builtin" in cfg.seeds:
        pool += [{"seed_id": f"builtin-{i:03d}", "instruction": text}
                 for i, text in enumerate(SEED_INSTRUCTIONS)]
    for name in cfg.seeds:
        if name in DERIVED:
            docs = sources.documents([name])
            for doc in rng.sample(docs, min(len(docs), 40)):
                # A few sentences keep the prompt short enough for a small teacher.
                text = " ".join(sources.sentences(doc["text"])[:4])[:900]
                pool.append({"seed_id": doc["id"], "instruction": DERIVED[name].format(text=text),
                             "source": text})
    return pool


def sample_prompts(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    pool = seed_instructions(cfg, rng)
    if not pool:
        raise ValueError("chat.seeds: no seed instructions selected")
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(cfg.count)]


def generate(prompts, engine, cfg: Config) -> list[dict[str, Any]]:
    # The recipe's teacher.sampling (top_p, ...) under this pipeline's own settings.
    sampling = sampling_for(engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.n, seed=cfg.seed)
    convs = [[{"role": "user", "content": p["instruction"]}] for p in prompts]
    outs = engine.chat(convs, sampling) if convs else []
    cands = []
    for p, conv, completions in zip(prompts, convs, outs):
        for k, comp in enumerate(completions):
            meta = {"seed_id": p["seed_id"], "sample": k, "teacher": engine.model,
                    "sampling": dataclasses.asdict(sampling)}
            if p.get("source"):
                meta["source"] = p["source"]
            cands.append(candidate(conv, comp, meta))
    return cands


NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")


def invented_numbers(text: str, source: str) -> list[str]:
    """Numbers in an answer about a text that the text does not contain."""
    known = set(NUMBER.findall(source))
    return [n for n in NUMBER.findall(text) if n not in known]


def check_text(text: str, prompt: str, cfg: Config, source: str | None = None) -> tuple[str | None, dict[str, Any]]:
    body, _ = strip_label(text)
    scores = {"words": len(words(body)), "repetition": repetition(body),
              "repeated_lines": repeated_lines(body)}
    if ROLE_LEAK.search(body):
        return "role_leak", scores
    if scores["repetition"] > cfg.max_repetition or scores["repeated_lines"] >= 3:
        return "degenerate_repetition", scores
    if scores["words"] < cfg.min_words:
        return "too_short", scores
    if body.strip().lower() in prompt.strip().lower():
        return "echo", scores
    if source is not None:
        scores["invented_numbers"] = invented_numbers(body, source)
        if scores["invented_numbers"]:
            return "invented_number", scores
    return None, scores


def validate(candidates, cfg: Config) -> list[dict[str, Any]]:
    for c in candidates:
        reason, c["scores"] = check_text(c["messages"][-1]["content"], c["messages"][-2]["content"], cfg,
                                         c.get("meta", {}).get("source"))
        # The text's grade: the share of its 4-grams that are not repeats.
        c["validators"] = {"well_formed": verdict(rejected_if_malformed(c)),
                           "text": verdict(reason, 1 - c["scores"]["repetition"])}
        c["reject_reason"] = first_failure(c["validators"])
    return candidates


def post_edit(c: dict[str, Any], cfg: Config) -> Record:
    text, actions = strip_label(c["messages"][-1]["content"])
    messages = [*c["messages"][:-1], {"role": "assistant", "content": text}]
    return make_record(NAME, messages, {**c["meta"], "scores": c["scores"], "post_edit": actions,
                                        "validators": c["validators"]})
