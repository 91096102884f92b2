"""Instructions a program can check: the steerability pipeline's validators.

Each constraint kind has a sampler (seeded arguments), a description (the instruction
the teacher reads) and a checker (the validator). `CONSTRAINTS[kind]` holds the three;
`check(kind, args, text)` is what rejection sampling calls.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

WORD_RE = re.compile(r"\b[\w'-]+\b")
BULLET_RE = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
NUMBERED_RE = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]+\]")
HIGHLIGHT_RE = re.compile(r"\*[^*\n]+\*")
TITLE_RE = re.compile(r"<<[^<>\n]+>>")

KEYWORDS = [
    "budget", "deadline", "customer", "quality", "team", "schedule", "safety", "growth",
    "feedback", "community", "energy", "privacy", "training", "design", "network", "health",
]
START_PHRASES = ["Dear team,", "Hello everyone,", "To whom it may concern,", "In short,"]
END_PHRASES = ["Best regards.", "Thank you for reading.", "Let me know if you have questions.",
               "That is all."]
# Common English function words: text in another language rarely contains several.
ENGLISH_MARKERS = {"the", "and", "of", "to", "a", "in", "is", "for", "that", "with", "on", "it"}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if WORD_RE.search(s)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _json_ok(text: str) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    try:
        json.loads(fenced.group(1) if fenced else body)
        return True
    except ValueError:
        return False


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))


@dataclass(frozen=True)
class Spec:
    family: str  # at most one constraint per family in a prompt (avoids contradictions)
    sample: Callable[[random.Random], dict[str, Any]]
    describe: Callable[..., str]
    check: Callable[..., bool]


CONSTRAINTS: dict[str, Spec] = {
    # -- length
    "max_words": Spec(
        "length", lambda r: {"n": r.choice([50, 80, 120, 150])},
        lambda n: f"Answer in at most {n} words.",
        lambda t, n: 0 < len(words(t)) <= n),
    "min_words": Spec(
        "length", lambda r: {"n": r.choice([30, 50, 80])},
        lambda n: f"Answer in at least {n} words.",
        lambda t, n: len(words(t)) >= n),
    "max_sentences": Spec(
        "length", lambda r: {"n": r.choice([2, 3, 4, 5])},
        lambda n: f"Use at most {n} sentences.",
        lambda t, n: 0 < len(sentences(t)) <= n),
    # -- structure
    "paragraphs": Spec(
        "structure", lambda r: {"n": r.choice([2, 3])},
        lambda n: f"Write exactly {n} paragraphs separated by a blank line.",
        lambda t, n: len(paragraphs(t)) == n),
    "bullets": Spec(
        "structure", lambda r: {"n": r.choice([3, 4, 5])},
        lambda n: f"Answer with exactly {n} bullet points, each line starting with '- '.",
        lambda t, n: len(BULLET_RE.findall(t)) == n),
    "numbered_list": Spec(
        "structure", lambda r: {"n": r.choice([3, 4, 5])},
        lambda n: f"Answer with a numbered list of exactly {n} items (1., 2., ...).",
        lambda t, n: len(NUMBERED_RE.findall(t)) == n),
    "json_output": Spec(
        "structure", lambda r: {},
        lambda: "Wrap your entire answer in valid JSON (no text outside the JSON).",
        lambda t: _json_ok(t)),
    "sections": Spec(
        "structure", lambda r: {"n": r.choice([2, 3])},
        lambda n: f"Split the answer into {n} sections, each starting with 'SECTION X' (X = 1, 2, ...).",
        lambda t, n: [int(x) for x in re.findall(r"^\s*SECTION (\d+)", t, re.MULTILINE)]
        == list(range(1, n + 1))),
    "two_responses": Spec(
        "structure", lambda r: {},
        lambda: "Give two different answers separated by a line of six asterisks: ******",
        lambda t: len([p for p in re.split(r"^\s*\*{6}\s*$", t, flags=re.MULTILINE) if p.strip()])
        == 2 and len(re.findall(r"^\s*\*{6}\s*$", t, re.MULTILINE)) == 1),
    "quoted": Spec(
        "structure", lambda r: {},
        lambda: "Wrap your entire answer in double quotation marks.",
        lambda t: len(t.strip()) > 2 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
    # -- edges
    "title": Spec(
        "edges", lambda r: {},
        lambda: "Give the answer a title wrapped in double angular brackets, like <<my title>>.",
        lambda t: bool(TITLE_RE.search(t))),
    "start_phrase": Spec(
        "edges", lambda r: {"phrase": r.choice(START_PHRASES)},
        lambda phrase: f"Start your answer with the exact phrase '{phrase}'.",
        lambda t, phrase: t.strip().startswith(phrase)),
    "end_phrase": Spec(
        "edges", lambda r: {"phrase": r.choice(END_PHRASES)},
        lambda phrase: f"End your answer with the exact phrase '{phrase}' and nothing after it.",
        lambda t, phrase: t.strip().endswith(phrase)),
    "postscript": Spec(
        "edges", lambda r: {"marker": r.choice(["P.S.", "P.P.S"])},
        lambda marker: f"At the end of your answer, add a postscript starting with {marker}",
        lambda t, marker: bool(re.search(rf"^\s*{re.escape(marker)}", t, re.MULTILINE))),
    # -- case
    "lowercase": Spec(
        "case", lambda r: {},
        lambda: "Write your entire answer in lowercase letters; no capital letters at all.",
        lambda t: bool(re.search(r"[a-z]", t)) and t == t.lower()),
    "uppercase": Spec(
        "case", lambda r: {},
        lambda: "Write your entire answer in English capital letters only.",
        lambda t: bool(re.search(r"[A-Z]", t)) and t == t.upper()),
    "max_capital_words": Spec(
        "case", lambda r: {"n": r.choice([1, 2, 3])},
        lambda n: f"Use at most {n} words written fully in capital letters.",
        lambda t, n: sum(1 for w in words(t) if len(w) > 1 and w.isupper()) <= n),
    # -- lexical
    "include_keywords": Spec(
        "keywords", lambda r: {"keywords": r.sample(KEYWORDS, 2)},
        lambda keywords: f"Include the keywords {', '.join(map(repr, keywords))}.",
        lambda t, keywords: all(_count_word(t, k) > 0 for k in keywords)),
    "exclude_keywords": Spec(
        "keywords", lambda r: {"keywords": r.sample(KEYWORDS, 2)},
        lambda keywords: f"Do not use the words {', '.join(map(repr, keywords))}.",
        lambda t, keywords: bool(t.strip()) and not any(_count_word(t, k) for k in keywords)),
    "keyword_frequency": Spec(
        "keywords", lambda r: {"keyword": r.choice(KEYWORDS), "n": r.choice([2, 3])},
        lambda keyword, n: f"Use the word '{keyword}' at least {n} times.",
        lambda t, keyword, n: _count_word(t, keyword) >= n),
    "no_commas": Spec(
        "punctuation", lambda r: {},
        lambda: "Do not use any commas in your answer.",
        lambda t: bool(t.strip()) and "," not in t),
    "placeholders": Spec(
        "punctuation", lambda r: {"n": r.choice([1, 2, 3])},
        lambda n: f"Include at least {n} placeholders in square brackets, like [name].",
        lambda t, n: len(PLACEHOLDER_RE.findall(t)) >= n),
    "highlights": Spec(
        "punctuation", lambda r: {"n": r.choice([1, 2, 3])},
        lambda n: f"Highlight at least {n} parts of the answer with single asterisks, like *this part*.",
        lambda t, n: len(HIGHLIGHT_RE.findall(t)) >= n),
    "english_only": Spec(
        "language", lambda r: {},
        lambda: "Write your entire answer in English only, with no other language.",
        lambda t: bool(t.strip()) and all(ord(c) < 0x250 or not c.isalpha() for c in t)
        and len({w.lower() for w in words(t)} & ENGLISH_MARKERS) >= 2),
}

# Kinds that make others impossible or meaningless when combined.
EXCLUSIVE = {
    "json_output": {"edges", "case", "punctuation", "length"},
    "quoted": {"edges"},
    "two_responses": {"edges"},
}


# Code edits for instructions of form only: they change a draft's case, wrap it, or add
# a fixed opening or closing phrase, and leave its words as the teacher wrote them.
# Applied in this order (case, then the edges, then the wrapping quotes); the checkers
# above still judge the edited text.
EDITS: dict[str, Callable[..., str]] = {
    "lowercase": lambda t: t.lower(),
    "uppercase": lambda t: t.upper(),
    "start_phrase": lambda t, phrase: f"{phrase}\n\n{t.strip()}",
    "end_phrase": lambda t, phrase: f"{t.strip()}\n\n{phrase}",
    "quoted": lambda t: f'"{t.strip()}"',
}


def edit(constraints: list[dict[str, Any]], text: str) -> tuple[str, list[str]]:
    """The text with EDITS applied for each constraint it does not follow yet, and the
    kinds edited."""
    edited = []
    for kind, fix in EDITS.items():
        for c in constraints:
            if c["kind"] == kind and not check(kind, c["args"], text):
                text = fix(text, **c["args"])
                edited.append(kind)
    return text, edited


def describe(kind: str, args: dict[str, Any]) -> str:
    return CONSTRAINTS[kind].describe(**args)


def check(kind: str, args: dict[str, Any], text: str) -> bool:
    return bool(CONSTRAINTS[kind].check(text, **args))


def sample_constraints(rng: random.Random, count: int, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """`count` compatible constraints (distinct families), each {"kind", "args"}."""
    pool = sorted(kinds or CONSTRAINTS)
    chosen: list[dict[str, Any]] = []
    banned: set[str] = set()
    for kind in rng.sample(pool, len(pool)):
        spec = CONSTRAINTS[kind]
        if spec.family in banned or (EXCLUSIVE.get(kind, set()) & {CONSTRAINTS[c["kind"]].family for c in chosen}):
            continue
        chosen.append({"kind": kind, "args": spec.sample(rng)})
        banned |= {spec.family} | EXCLUSIVE.get(kind, set())
        if len(chosen) == count:
            break
    return chosen
