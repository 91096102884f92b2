"""Long-context retention, RULER-style: does the student still find what a long prompt
hides, at each of the recipe's length buckets?

Tasks are RULER's (Hsieh et al., 2024, arXiv 2404.06654) as lm-evaluation-harness builds
them (`lm_eval/tasks/ruler/`): needle-in-a-haystack variants (single, multi-key,
multi-value, multi-query), variable tracking (`vt`), common-words extraction (`cwe`) and
optionally frequent-words extraction (`fwe`). lm-eval's own generators make every item;
we hand them two things:

- a tokenizer stand-in that counts a prompt as the student sees it (a user turn rendered
  with its training template, plus the generation prompt), so "4096" means 4,096 of the
  student's tokens including RULER's generation budget;
- for the variants whose haystack is an essay (lm-eval downloads Paul Graham's essays
  from the hub, which does not work offline) the project's offline filler text instead,
  with every passage the `needle` training pipeline used taken out.

Each item carries RULER's answer prefix as lm-eval emits it (the sample's `gen_prefix`:
"The special magic number for X mentioned in the provided text is", vt's "Answer:
According to the chain(s) of variable assignment ... they are:", cwe's and fwe's
"Answer: ..."): the prompt is a user turn followed by an assistant turn holding the
prefix, which the engines continue (pipeline.chat_template.prompt_text: lm-eval's chat
mode, `continue_final_message`), and the answer scored is the continuation alone, as
lm-eval scores it. Lengths count the prefix too.

No key, value or haystack passage of an item may coincide with the `needle` pipeline's
training records (accepted and rejected): items that would are drawn again, and the
final check raises ContaminationError if one still does.

Scoring is lm-eval's (`string_match_all`: the fraction of references found in the
answer, case-insensitive), x100, averaged per task x length, with lm-eval's standard
error of each mean in `stderr` (evals/standard_error.py). Per-item rows carry `id`,
`task`, `length`, `score` and `passed` (every reference found). The effective length is
RULER's: the largest length whose task average reaches the threshold (85.6, Llama-2-7B
at 4K in the paper), counted up from the shortest, so a length above one that fails
never counts; 0 when the shortest fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evals import standard_error
from pipeline import sources
from pipeline.chat_template import prompt_text
from pipeline.recipe import Section
from pipeline.contract import read_records
from pipeline.records import stable_hash

NAME = "retention"
log = logging.getLogger(__name__)

RULER_THRESHOLD = 85.6
# The needle pipeline's outputs under the context's data_root.
NEEDLE_RECORDS = ("synth/needle/accepted.jsonl", "synth/needle/rejected.jsonl")
# RULER's generators are made for 4K and up. Below 1K their steps (500 essay words,
# one-shot examples of ~300-500 tokens) leave no room for the item: cwe comes out
# without words, vt's fitting loop never ends.
MIN_LENGTH = 1024
CWE_STEP = 32  # tokens to size cwe down by when its fresh words overflow the length
# Fresh draws per task x length before a still-contaminated item is an error.
MAX_DRAWS = 8

# lm-eval's niah_utils: the generate_samples() arguments of each NIAH task.
NIAH = {
    "niah_single_1": {"type_haystack": "repeat", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_2": {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_3": {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids"},
    "niah_multikey_1": {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers", "num_needle_k": 4},
    "niah_multikey_2": {"type_haystack": "needle", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_multikey_3": {"type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"},
    "niah_multivalue": {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers", "num_needle_v": 4},
    "niah_multiquery": {"type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers", "num_needle_q": 4},
}
Task = Literal[
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
]


class Config(Section):
    enabled: bool = True
    # One NIAH variant of each kind (single and multi-key as lm-eval builds them offline,
    # multi-value and multi-query over our filler), variable tracking, common words.
    tasks: list[Task] = Field(default_factory=lambda: [
        "niah_single_1", "niah_multikey_2", "niah_multivalue", "niah_multiquery", "vt", "cwe",
    ])
    count: int = Field(2, ge=1)  # items per task x length (RULER uses 500)
    # The interface's fallback budget; every retention item carries RULER's own.
    max_tokens: int = Field(128, gt=0)
    seed: int = 0
    filler: Literal["auto", "fortunes", "lee", "pydoc"] = "auto"  # essay-haystack text


class ContaminationError(ValueError):
    """An eval item shares a key, value or haystack passage with needle training data."""


# ------------------------------------------------------------------ needle training data
_WORD = re.compile(r"\w+(?:-\w+)*")
MIN_PASSAGE_CHARS = 40  # shorter blocks ("Question: ...", one-liners) are not passages


def _normalise(text: str) -> str:
    return " ".join(text.split())


@dataclass
class NeedleStrings:
    """What the needle pipeline trained on: keys, values, haystack passages."""

    keys: set[str] = field(default_factory=set)
    values: set[str] = field(default_factory=set)
    passages: set[str] = field(default_factory=set)  # whitespace-normalised
    filler_ids: set[str] = field(default_factory=set)
    records: int = 0
    missing: list[str] = field(default_factory=list)

    def found_in(self, text: str) -> list[str]:
        """The training keys/values (whole words) and passages that occur in text."""
        hits = sorted(set(_WORD.findall(text)) & (self.keys | self.values))
        flat = _normalise(text)
        return hits + sorted(p[:60] + "..." for p in self.passages if p in flat)

    @property
    def note(self) -> str:
        if self.missing:
            return f"not checked: {', '.join(self.missing)} missing"
        return f"disjoint from {self.records} needle records"


def needle_strings(data_root: str | Path | None) -> NeedleStrings:
    """Keys, values and filler passages of the needle pipeline's records. Missing files
    are noted (the recipe may not generate needle data), not fatal."""
    found = NeedleStrings()
    for name in NEEDLE_RECORDS:
        path = Path(data_root or ".") / name
        if not path.is_file():
            found.missing.append(str(path))
            continue
        for record in read_records(path):
            found.records += 1
            for needle in record.meta.needles:  # the needle pipeline's own meta keys
                found.keys.add(needle["key"])
                found.values.add(needle["value"])
            found.filler_ids.update(record.meta.seed_ids["filler"])
            # The user turn is instruction, blocks (filler and needles), question.
            blocks = record.messages[0].content.split("\n\n")[1:-1]
            found.passages.update(b for b in map(_normalise, blocks) if len(b) >= MIN_PASSAGE_CHARS)
    return found


def check_disjoint(items: list[dict[str, Any]], needle: NeedleStrings) -> None:
    """Raise ContaminationError naming every item that shares a needle training string."""
    bad = {}
    for item in items:
        hits = needle.found_in(_item_text(item))
        if hits:
            bad[item["id"]] = hits
    if bad:
        lines = "\n".join(f"  {i}: {', '.join(h[:5])}" for i, h in bad.items())
        raise ContaminationError(
            f"{len(bad)} retention item(s) share keys, values or passages with the needle "
            f"pipeline's training records:\n{lines}"
        )


def _item_text(item: dict[str, Any]) -> str:
    return "\n".join([*(m["content"] for m in item["messages"]), *item["references"]])


# ------------------------------------------------------------------------ lengths
# Where lm-eval cuts the answer prefix off a vt / cwe / fwe prompt it sized with the
# prefix on (vt_utils, cwe_utils, fwe_utils: `input_text.rfind(...)`).
VT_PREFIX_START = " Answer: According to the chain(s) of variable assignment"
# The NIAH question; lm-eval's gen_prefix restates it (prepare_niah.generate_samples).
NIAH_QUESTION = re.compile(r"What (is|are all) the special magic (\S+) for (.+) mentioned in the provided text\?\s*\Z")


def answer_prefixes() -> tuple[str, ...]:
    """The prefix openings lm-eval cuts vt, cwe and fwe prompts at."""
    from lm_eval.tasks.ruler import cwe_utils, fwe_utils

    return VT_PREFIX_START, cwe_utils.CONFIG["answer_prefix"], fwe_utils.CONFIG["answer_prefix"]


def split_answer_prefix(text: str) -> tuple[str, str | None]:
    """(prompt, gen_prefix) as lm-eval makes them from a text its generators sized:
    vt, cwe and fwe size the prompt with the prefix on and cut it off at its opening;
    NIAH's prefix restates the closing question ("What is the special magic number for
    X ...?" -> "The special magic number for X mentioned in the provided text is")."""
    for start in answer_prefixes():
        cut = text.rfind(start)
        if cut >= 0:
            # vt keeps its prompt as cut; cwe and fwe strip it (lm-eval's code).
            prompt = text[:cut] if start == VT_PREFIX_START else text[:cut].strip()
            return prompt, text[cut:].strip()
    question = NIAH_QUESTION.search(text)
    if question:
        verb, kind, query = question.groups()
        return text, f"The special magic {kind} for {query} mentioned in the provided text {'is' if verb == 'is' else 'are'}"
    return text, None


def prompt_messages(prompt: str, gen_prefix: str | None) -> list[dict[str, str]]:
    """A user turn, then the answer prefix as an assistant turn the model continues."""
    messages = [{"role": "user", "content": prompt}]
    return messages + [{"role": "assistant", "content": gen_prefix}] if gen_prefix else messages


class RenderedTokenizer:
    """Stands in for the tokenizer lm-eval's RULER generators are handed. They size a
    prompt by `len(tokenizer(text).input_ids)`; this counts the text as the student
    sees it: a user turn rendered with its chat template, then the generation prompt
    and the answer prefix lm-eval emits for that text (split_answer_prefix)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, messages: list[dict[str, Any]]) -> int:
        text = prompt_text(self.tokenizer, messages)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=range(self.count(prompt_messages(*split_answer_prefix(text)))))


# ------------------------------------------------------------------------ generation
@contextlib.contextmanager
def _seeded(seed: int):
    """lm-eval's generators draw from the global random/numpy states (cwe also from its
    module RNG): seed them all for one call and restore them after."""
    from lm_eval.tasks.ruler import cwe_utils

    states = random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    cwe_utils.RNG.seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cwe_utils.RNG.setstate(states[2])


def filler_haystack(source: str, needle: NeedleStrings, seed: int) -> list[str]:
    """RULER's essay haystack (a list of words) made from our filler passages, in a
    seeded order, without any passage the needle pipeline used or that holds one of
    its keys, values or passages."""
    passages = [p for p in sources.filler_passages(source) if p["id"] not in needle.filler_ids]
    joined = _normalise(" ".join(p["text"] for p in passages))
    # Substring search over the whole text first: only passages near a hit are re-checked.
    suspects = [p for p in needle.passages if p in joined]
    keep = []
    for p in passages:
        text = _normalise(p["text"])
        if text in needle.passages or any(s in text for s in suspects):
            continue
        if set(_WORD.findall(text)) & (needle.keys | needle.values):
            continue
        keep.append(text)
    random.Random(seed).shuffle(keep)
    return " ".join(keep).split(" ")


def ruler_samples(task: str, length: int, count: int, tokenizer: RenderedTokenizer,
                  essay: list[str] | None, seed: int) -> list[dict[str, Any]]:
    """`count` samples of one RULER task at one length from lm-eval's own generator:
    dicts with input, gen_prefix (lm-eval's answer prefix), outputs (the references),
    max_tokens (its generation budget)."""
    quiet = contextlib.redirect_stdout(io.StringIO())  # vt prints every fitting step
    with _seeded(seed), quiet:
        if task in NIAH:
            from lm_eval.tasks.ruler import niah_utils, prepare_niah

            spec = NIAH[task]
            haystack = essay if spec["type_haystack"] == "essay" else prepare_niah.get_haystack(spec["type_haystack"])
            samples = prepare_niah.generate_samples(
                haystack, TOKENIZER=tokenizer, max_seq_length=length, template=niah_utils.TEMPLATE,
                num_samples=count, random_seed=seed, **spec,
            )
            budget = 128  # generate_samples' tokens_to_generate default, as lm-eval calls it
        elif task == "vt":
            from lm_eval.tasks.ruler import vt_utils

            # lm-eval's get_dataset: a one-shot example sized to 500 tokens, then the items.
            example = vt_utils.sys_vartrack_w_noise_random(
                tokenizer=tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
            samples = vt_utils.sys_vartrack_w_noise_random(
                tokenizer=tokenizer, num_samples=count, max_seq_length=length, icl_example=example)
            budget = vt_utils.CONFIG["variable_tracking"]["tokens_to_generate"]
        elif task == "cwe":
            from lm_eval.tasks.ruler import cwe_utils

            budget = cwe_utils.CONFIG["tokens_to_generate"]
            # RULER's prompt opens with a one-shot example. lm-eval sizes the items with
            # it, then leaves it out (items ran at half their length) and draws the words
            # afresh: put it back, and size down in steps until every prompt fits.
            limit = length
            while True:
                samples = cwe_utils.sys_word_pair_random(
                    num_samples=count, max_seq_length=limit, tokenizer=tokenizer, tokens_to_generate=budget)
                for s in samples:
                    s["input"] = s["input_example"] + "\n" + s["input"]
                if all(tokenizer.count(prompt_messages(s["input"], s["gen_prefix"])) + budget <= length
                       for s in samples):
                    break
                limit -= CWE_STEP
        else:  # fwe
            from lm_eval.tasks.ruler import fwe_utils

            budget = fwe_utils.CONFIG["tokens_to_generate"]
            # fwe fills the prompt up to max_seq_length and adds its budget on top:
            # leave the budget out of the length so the item fits its bucket.
            samples = fwe_utils.sys_kwext(
                tokenizer=tokenizer, max_seq_length=length - budget, num_samples=count, tokens_to_generate=budget)
    for s in samples:  # lm-eval checks this for NIAH only
        if not s["outputs"] or not all(r in s["input"] for r in s["outputs"]):
            raise ValueError(f"retention {task} @ {length}: lm-eval built an item without its references")
        if task in NIAH and split_answer_prefix(s["input"])[1] != s["gen_prefix"]:
            # The lengths were counted with the prefix we derive: it must be lm-eval's.
            raise ValueError(f"retention {task} @ {length}: lm-eval's answer prefix {s['gen_prefix']!r} "
                             f"is not the one derived from its question")
    return [{"input": s["input"], "gen_prefix": s["gen_prefix"], "outputs": list(s["outputs"]),
             "max_tokens": budget} for s in samples]


def retention_threshold(context: dict) -> float:
    """eval.retention_threshold: given in the context, else the recipe's eval section.
    Items carry it to score(), which sees no context."""
    if "retention_threshold" in context:
        return float(context["retention_threshold"])
    recipe = context.get("recipe")
    return float(recipe.eval.retention_threshold) if recipe is not None else RULER_THRESHOLD


def build_items(cfg: Config, tokenizer, context: dict) -> list[dict[str, Any]]:
    buckets = sorted(set(context["length_buckets"]))
    if not buckets or buckets[0] < MIN_LENGTH:
        raise ValueError(f"retention: length_buckets {buckets}: RULER's tasks need lengths of at least {MIN_LENGTH}")
    threshold = retention_threshold(context)
    needle = needle_strings(context.get("data_root"))
    if needle.missing:
        log.warning("retention: needle training records %s; items are not checked against them",
                    ", ".join(needle.missing))
    counter = RenderedTokenizer(tokenizer)
    # The dev split draws other items from the same generators (another seed).
    dev = context.get("split", "test") == "dev"
    seed = f"{cfg.seed}-dev" if dev else cfg.seed
    essay = None
    if any(NIAH.get(t, {}).get("type_haystack") == "essay" for t in cfg.tasks):
        essay = filler_haystack(cfg.filler, needle, int(stable_hash(seed), 16) if dev else cfg.seed)

    items = []
    for task in cfg.tasks:
        for length in buckets:
            clean, draw = [], 0
            while len(clean) < cfg.count:
                if draw == MAX_DRAWS:
                    raise ContaminationError(
                        f"retention {task} @ {length}: {MAX_DRAWS} draws gave {len(clean)} of {cfg.count} items "
                        "(the others shared needle training strings or did not fit the length)")
                draw_seed = int(stable_hash(NAME, seed, task, length, draw), 16)
                try:
                    fresh = ruler_samples(task, length, cfg.count - len(clean), counter, essay, draw_seed)
                except ValueError as exc:
                    # lm-eval skips a sample whose haystack does not fit the length, and
                    # raises when a draw keeps none: a small remainder at a tight length
                    # (essay at 1K shrinks by 500 words) can; draw again, other seed.
                    if "Could not generate any sample" not in str(exc):
                        raise
                    fresh = []
                clean += [s for s in fresh if not needle.found_in(s["input"] + "\n" + "\n".join(s["outputs"]))]
                draw += 1
            for i, s in enumerate(clean):
                messages = prompt_messages(s["input"], s["gen_prefix"])
                tokens = counter.count(messages)
                if tokens + s["max_tokens"] > length:  # lm-eval's generators promise this
                    raise AssertionError(f"retention {task} @ {length}: {tokens} + {s['max_tokens']} tokens")
                items.append({
                    "id": f"{task}/{length}/{i}", "messages": messages, "gen_prefix": s["gen_prefix"],
                    "max_tokens": s["max_tokens"],
                    "task": task, "length": length, "tokens": tokens, "references": s["outputs"],
                    "retention_threshold": threshold, "needle_check": needle.note,
                })
    check_disjoint(items, needle)
    return items


# ------------------------------------------------------------------------ scoring
def item_score(answer: str, references: list[str]) -> float:
    """lm-eval's RULER metric for one answer, in percent."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    return 100.0 * string_match_all(postprocess_pred([answer]), [references])


def effective_length(average: dict[int, float], threshold: float) -> int:
    """The largest length whose average reaches the threshold, counted up from the
    shortest: a length above a failing one does not count. 0 if the shortest fails."""
    effective = 0
    for length in sorted(average):
        if average[length] < threshold:
            break
        effective = length
    return effective


def score(items: list[dict[str, Any]], answers: list[str], cfg: Config) -> dict[str, Any]:
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_item = []
    for item, answer in zip(items, answers, strict=True):
        value = item_score(answer, item["references"])
        cells[item["task"]][item["length"]].append(value)
        missing = [r for r in item["references"] if r.lower() not in answer.lower()]
        per_item.append({
            "id": item["id"], "task": item["task"], "length": item["length"], "score": value, "passed": not missing,
            "reason": f"missing {', '.join(missing[:4])}" if missing else "all references found",
        })
    metrics: dict[str, Any] = {
        task: {str(length): round(float(np.mean(v)), 2) for length, v in sorted(by_length.items())}
        for task, by_length in cells.items()
    }
    stderr: dict[str, Any] = {
        task: {str(length): standard_error.of_mean(v) for length, v in sorted(by_length.items())}
        for task, by_length in cells.items()
    }
    lengths = sorted({length for by_length in cells.values() for length in by_length})
    average = {length: float(np.mean([np.mean(cells[t][length]) for t in cells if length in cells[t]]))
               for length in lengths}
    threshold = items[0]["retention_threshold"] if items else RULER_THRESHOLD
    metrics["average"] = {str(length): round(v, 2) for length, v in average.items()}
    # The average is a mean of the tasks' means (each task its own haystacks).
    stderr["average"] = {str(length): standard_error.of_mean_of_means(
        [stderr[t][str(length)] for t in cells if length in cells[t]]) for length in lengths}
    metrics["effective_length"] = effective_length(average, threshold)
    metrics["threshold"] = threshold
    metrics["stderr"] = stderr
    return {"metrics": metrics, "items": per_item}
