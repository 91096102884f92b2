"""Tool use: function calls whose arguments we sampled, requests the teacher wrote for
them, and teacher answers kept only when their calls equal the sampled ones.

The function catalogue is BFCL's (PyPI `bfcl-eval`, Apache-2.0): the python-style
categories' function schemas, with argument values drawn from BFCL's ground-truth
answers where they exist and from the schema (enums, types) otherwise. Two fixed slices
of BFCL items are reserved, the held-out slice the gate scores and the dev slice
choices are made on: their functions are never sampled, and the dedup stage
decontaminates against their questions.

(i)   sample_prompts: call sets (one call; parallel calls of one function; calls across
      functions) and irrelevance cases (BFCL irrelevance requests, no tool fits; and
      `mismatch`: a BFCL call set's own request offered only other items' functions,
      so the student sees requests a function would serve when none offered does; and
      `near_miss`: a BFCL call set's request offered only its own item's functions that
      its calls do not use, the distractors BFCL's authors chose from the request's
      domain, as BFCL's irrelevance items offer a function of the request's domain)
(ii)  generate: the user request for each call set (`requests`: the teacher writes it
      from the calls, or rewrites in a user's words a request that code stated from the
      function's description and the values; best of `request_n`), then the answer
      (`answers`: the teacher's, as a function-calling assistant with the tools plus
      distractors in context; or the sampled calls themselves, built by code; or both)
(iii) validate: the request states every value; parsed calls == sampled calls
      (order-insensitive, values normalised by schema type); irrelevance: no call
(iv)  post_edit: calls as structured `tool_calls` with schema-typed arguments

Every record's meta says who made it: `request_source` (teacher, paraphrase, or bfcl
for BFCL's own irrelevance questions) and `answer_source` (teacher or code); a
mismatch record also has `tools_source: other_items`, a near_miss record
`tools_source: own_distractors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections import Counter
from typing import Any, Literal

from pydantic import Field

from pipeline.bfcl import openai_tool, tool_name
from pipeline.chat_template import parse_tool_calls
from pipeline.recipe import Section
from pipeline.contract import Record, make_record
from pipeline.bfcl import (
    CATALOGUE_FILES, HELDOUT_FRACTION, IRRELEVANCE_FILES, bfcl_answers, bfcl_items, is_reserved,
)
from pipeline import sources
from pipeline.engines import sampling_for
from synth_data.four_steps import first_failure, rejected_if_malformed, verdict

NAME = "tool_use"
KINDS = ("single", "parallel", "multiple", "irrelevance", "mismatch", "near_miss")
# The answer code writes where no offered function fits (the few-shot turn's words).
REFUSAL = "None of the available functions can do that, sorry."

REJECT_REASONS = (
    "empty", "truncated", "empty_request", "request_missing_value", "malformed_call",
    "no_call", "call_when_irrelevant", "wrong_function", "missing_call", "extra_call",
    "wrong_type", "wrong_arguments",
)


class Config(Section):
    count: int = Field(16, ge=0)  # call sets (prompts)
    # Share of each kind of call set.
    mix: dict[str, float] = Field(
        default_factory=lambda: {"single": 0.4, "parallel": 0.2, "multiple": 0.2, "irrelevance": 0.2}
    )
    max_parallel: int = Field(3, ge=2)
    distractors: int = Field(1, ge=0)  # extra tools in context that must not be called
    optional_p: float = Field(0.3, ge=0, le=1)  # chance an optional argument is set
    # BFCL's held-out slice (gated); the dev slice is as large; generation samples neither.
    heldout_fraction: float = Field(HELDOUT_FRACTION, ge=0, lt=0.5)
    # Who writes a call set's request. teacher: from the calls. paraphrase: code states
    # the request from the function's description and the values, and the teacher
    # rewrites it as a user would (a 135M teacher rewrites a sentence far more often
    # than it writes one from a call list). Either way the validator checks that the
    # request states every value.
    # bfcl: the call set and its request are a BFCL item's own (its question and its
    # ground-truth calls), from the items outside the held-out slice whose functions
    # are all in the catalogue: real user requests, seeds the eval never uses.
    requests: Literal["teacher", "paraphrase", "bfcl"] = "teacher"
    request_n: int = Field(1, ge=1)  # request samples per call set; the first stating every value is used
    # Who writes a call set's answer. teacher: the teacher's answers, kept when their calls
    # match. code: the sampled calls themselves (correct by construction; irrelevance
    # requests are still answered by the teacher). auto: the teacher's answers plus the
    # code's, so every call set with a valid request yields a record and the teacher's
    # wrong answers remain as rejected samples (preference pairs).
    answers: Literal["teacher", "code", "auto"] = "teacher"
    # Who answers a request no offered function fits (irrelevance, mismatch, near_miss). teacher:
    # its answer, kept when it calls nothing. code: REFUSAL, one uniform "no call"
    # answer, as uniform as the code-built calls are.
    irrelevance_answers: Literal["teacher", "code"] = "teacher"
    # Call sets whose record (tools, request, calls; in student tokens as trained) would
    # be longer are not sampled: a few BFCL items offer dozens of functions, more than
    # the teacher's 4K window and costly to train on. None = no limit.
    max_record_tokens: int | None = Field(None, gt=0)
    n: int = Field(2, ge=1)  # teacher answers per request
    temperature: float = 0.3
    max_tokens: int = Field(160, gt=0)
    request_max_tokens: int = Field(80, gt=0)
    seed: int = 0


def plain(option: Any) -> Any:
    """A value from a BFCL ground-truth option: a dict option holds option lists of its
    own (its keys' first non-empty option is taken; a key with none is left out)."""
    if not isinstance(option, dict):
        return option
    out = {}
    for key, options in option.items():
        value = next((plain(o) for o in options if o != ""), None) if isinstance(options, list) else options
        if value is not None:
            out[key] = value
    return out


@functools.cache
def catalogue(fraction: float) -> dict[str, dict[str, Any]]:
    """name -> {"function": BFCL schema, "pool": {param: [real values]}}, without any
    function that appears in a held-out or dev item."""
    functions: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, list[Any]]] = {}
    banned: set[str] = set()
    for category in CATALOGUE_FILES:
        answers = bfcl_answers(category)
        for item in bfcl_items(category):
            names = {fn["name"] for fn in item["function"]}
            if is_reserved(item["id"], fraction):
                banned |= names
                continue
            for fn in item["function"]:
                functions.setdefault(fn["name"], fn)
            for call in answers.get(item["id"], []):
                for name, args in call.items():
                    for param, options in args.items():
                        value = next((plain(o) for o in options if o != ""), None)
                        if value is not None and value not in pools.setdefault(name, {}).setdefault(param, []):
                            pools[name][param].append(value)
    out = {}
    for name, fn in sorted(functions.items()):
        if name in banned:
            continue
        # Some ground-truth values break their own schema (0.5 for an integer): never sampled.
        props = openai_tool(fn)["function"]["parameters"].get("properties", {})
        pool = {param: [v for v in values if _fits(v, props.get(param))]
                for param, values in pools.get(name, {}).items()}
        out[name] = {"function": fn, "pool": pool}
    return out


def _fits(value: Any, spec: dict[str, Any] | None) -> bool:
    try:
        normalise(value, spec)
        return True
    except TypeMismatch:
        return False


# ----------------------------------------------------------- sampling assignments
def sample_value(spec: dict[str, Any], pool: list[Any], rng: random.Random) -> Any:
    """A valid value for one parameter, or None when none can be made up honestly."""
    if spec.get("enum"):
        # BFCL puts an array's item choices on the array itself.
        return [rng.choice(spec["enum"])] if spec.get("type") == "array" else rng.choice(spec["enum"])
    if pool:
        return rng.choice(pool)
    kind = spec.get("type")
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "float":
        return round(rng.uniform(1, 100), 1)
    if kind == "boolean":
        return rng.choice([True, False])
    if kind in ("array", "tuple") and isinstance(spec.get("items"), dict):
        items = [sample_value(spec["items"], [], rng) for _ in range(rng.randint(1, 3))]
        return None if any(v is None for v in items) else items
    return None  # free strings/objects without real examples: skip rather than invent


def sample_assignment(entry: dict[str, Any], rng: random.Random, optional_p: float) -> dict[str, Any] | None:
    params = entry["function"].get("parameters", {})
    props, required = params.get("properties", {}), set(params.get("required", []))
    args = {}
    for name, spec in props.items():
        if name not in required and rng.random() >= optional_p:
            continue
        value = sample_value(spec, entry["pool"].get(name, []), rng)
        if value is None:
            if name in required:
                return None
            continue
        args[name] = value
    return args


def _call_sets(cfg: Config, rng: random.Random, kind: str, cat: dict[str, Any], names: list[str]):
    """One call set of the given kind: [{"name", "arguments"}], or None on failure."""
    for _ in range(20):  # a few tries: some functions have no samplable assignment
        if kind == "multiple":
            picks = rng.sample(names, rng.randint(2, cfg.max_parallel))
        else:
            picks = [rng.choice(names)] * (1 if kind == "single" else rng.randint(2, cfg.max_parallel))
        calls = []
        for name in picks:
            args = sample_assignment(cat[name], rng, cfg.optional_p)
            if args is None or {"name": name, "arguments": args} in calls:
                break
            calls.append({"name": name, "arguments": args})
        else:
            return calls
    return None


# ------------------------------------------------------------------------ (i)
def sample_prompts(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    unknown = sorted(set(cfg.mix) - set(KINDS))
    if unknown:
        raise ValueError(f"generate.tool_use.mix: unknown kinds {unknown} (known: {', '.join(KINDS)})")
    for kind in ("mismatch", "near_miss"):
        if cfg.mix.get(kind, 0) > 0 and cfg.requests != "bfcl":
            raise ValueError(f"generate.tool_use.mix: {kind} takes BFCL call sets' own requests; "
                             "it needs generate.tool_use.requests: bfcl")
    cat = catalogue(cfg.heldout_fraction)
    names = list(cat)
    irrelevant = [it for f in IRRELEVANCE_FILES for it in bfcl_items(f)
                  if not is_reserved(it["id"], cfg.heldout_fraction)]
    kinds, weights = zip(*[(k, w) for k, w in cfg.mix.items() if w > 0])
    # BFCL items in a seeded order per kind, taken in turn: no item repeats before all are used.
    pools = {"irrelevance": irrelevant, **(bfcl_call_sets(cfg.heldout_fraction) if cfg.requests == "bfcl" else {})}
    # Only when asked for: another queue draws from rng and would change every other
    # recipe's sample.
    if cfg.mix.get("near_miss", 0) > 0:  # call sets whose item offers functions its calls leave unused
        pools["near_miss"] = [(item, calls) for kind in ("single", "parallel", "multiple") for item, calls in pools[kind]
                              if _unused_functions(item, calls)]
    queues, taken = {k: rng.sample(v, len(v)) for k, v in pools.items()}, Counter()

    def next_item(kind: str):
        taken[kind] += 1
        return queues[kind][(taken[kind] - 1) % len(queues[kind])]

    prompts = []
    for i in range(cfg.count):
        kind = rng.choices(kinds, weights)[0]
        pid = f"tool-{cfg.seed}-{i}"
        if kind == "irrelevance":
            item = next_item(kind)
            prompts.append({"id": pid, "kind": kind, "source": item["id"], "calls": [],
                            "request": item["question"][0][-1]["content"],
                            "tools": [openai_tool(fn) for fn in item["function"]]})
            continue
        if kind == "mismatch":
            # A call set's request, not used by any call record before the pool runs out,
            # with functions from other items only (none named as the item's own).
            item, _ = next_item(rng.choice([k for k in ("single", "parallel", "multiple") if pools.get(k)]))
            own = {fn["name"] for fn in item["function"]}
            others = [n for n in names if n not in own]
            offered = [cat[n]["function"] for n in rng.sample(others, min(len(own) + cfg.distractors, len(others)))]
            prompt = {"id": pid, "kind": kind, "source": item["id"], "calls": [],
                      "request": item["question"][0][-1]["content"], "tools_source": "other_items",
                      "tools": [openai_tool(fn) for fn in offered]}
            if not cfg.max_record_tokens or _record_tokens(prompt) <= cfg.max_record_tokens:
                prompts.append(prompt)
            continue
        if kind == "near_miss":
            # Its own queue: the same request may also appear with its function (a call).
            item, calls = next_item(kind)
            prompt = {"id": pid, "kind": kind, "source": item["id"], "calls": [],
                      "request": item["question"][0][-1]["content"], "tools_source": "own_distractors",
                      "tools": [openai_tool(fn) for fn in _unused_functions(item, calls)]}
            if not cfg.max_record_tokens or _record_tokens(prompt) <= cfg.max_record_tokens:
                prompts.append(prompt)
            continue
        if cfg.requests == "bfcl":
            item, calls = next_item(kind)
            # The item's own schemas: a function name can carry other schemas in other items.
            prompt = {"source": item["id"], "request": item["question"][0][-1]["content"]}
            offered = list(item["function"])
        else:
            calls = _call_sets(cfg, rng, kind, cat, names)
            if calls is None:
                continue
            prompt = {"source": "bfcl-catalogue"}
            offered = [cat[n]["function"] for n in sorted({c["name"] for c in calls})]
        used = {fn["name"] for fn in offered}
        others = [n for n in names if n not in used]
        in_context = offered + [cat[n]["function"] for n in rng.sample(others, min(cfg.distractors, len(others)))]
        rng.shuffle(in_context)
        prompt.update(id=pid, kind=kind, tools=[openai_tool(fn) for fn in in_context],
                      calls=[{"name": tool_name(c["name"]), "arguments": c["arguments"]} for c in calls])
        if cfg.max_record_tokens and _record_tokens(prompt) > cfg.max_record_tokens:
            continue
        prompts.append(prompt)
    return prompts


def _unused_functions(item: dict[str, Any], calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    called = {c["name"] for c in calls}
    return [fn for fn in item["function"] if fn["name"] not in called]


def _record_tokens(prompt: dict[str, Any]) -> int:
    """The tokens of the record this call set becomes (the stated request stands in for
    one still to be written)."""
    request = prompt.get("request") or stated_request(prompt["calls"], prompt["tools"])
    return sources.conversation_tokens([{"role": "user", "content": request},
                                {"role": "assistant", "content": code_answer(prompt["calls"])}], prompt["tools"])


@functools.cache
def bfcl_call_sets(fraction: float) -> dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
    """kind -> [(BFCL item, its call set)] for the items outside the reserved slices whose
    functions are all in the catalogue. Each argument takes the first ground-truth
    option the question states, else is left out where BFCL allows that, else takes
    the first option (the request check then rejects it)."""
    cat = catalogue(fraction)
    out: dict[str, list] = {"single": [], "parallel": [], "multiple": []}
    for category in CATALOGUE_FILES:
        answers = bfcl_answers(category)
        for item in bfcl_items(category):
            if item["id"] not in answers or not all(fn["name"] in cat for fn in item["function"]):
                continue
            question = item["question"][0][-1]["content"]
            calls = []
            for truth in answers[item["id"]]:
                (name, options), = truth.items()
                args = {}
                for param, opts in options.items():
                    values = [plain(o) for o in opts if o != ""]
                    stated = [v for v in values if _request_mentions(question, [{"arguments": {param: v}}])]
                    if values and (stated or "" not in opts):
                        args[param] = (stated or values)[0]
                calls.append({"name": name, "arguments": args})
            tools = {tool_name(fn["name"]): openai_tool(fn)["function"] for fn in item["function"]}
            try:  # some ground truths break their own schema (0.5 for an integer): no seed
                [canonical_call({**c, "name": tool_name(c["name"])}, tools) for c in calls]
            except TypeMismatch:
                continue
            kind = "single" if len(calls) == 1 else "parallel" if len({c["name"] for c in calls}) == 1 else "multiple"
            out[kind].append((item, calls))
    return out


# ----------------------------------------------------------------------- (ii)
REQUEST_PROMPT = """Write the message a user would send to an assistant so that the assistant makes exactly the function calls below. Mention every argument value. Reply with the message only.

Example
Calls:
calculate_triangle_area(base=10, height=5)
Message: Find the area of a triangle with a base of 10 units and a height of 5 units.

Calls:
{calls}
Message:"""

PARAPHRASE_PROMPT = """Rewrite this request the way a user would ask an assistant. Keep every name, number and value exactly as written. Reply with the rewritten request only.

Request: {request}"""
# Worked rewrites before the real one (few-shot): one call, then two calls of one function.
PARAPHRASE_SHOTS = [
    {"role": "user", "content": PARAPHRASE_PROMPT.format(
        request="Calculate the area of a triangle, with base 10 and height 5.")},
    {"role": "assistant", "content": "What is the area of a triangle with a base of 10 and a height of 5?"},
    {"role": "user", "content": PARAPHRASE_PROMPT.format(
        request="Get the current weather in a city, for each of these: city Paris, unit celsius; "
                "city Rome, unit celsius.")},
    {"role": "assistant", "content": "What is the weather like in Paris and in Rome right now, in celsius?"},
]

ANSWER_SYSTEM = """You are a function-calling assistant. If the user's request needs one or more of the functions, reply only with one <tool_call> block per call and nothing else. If no function fits the request, answer briefly in plain text and call nothing."""
# Two worked turns before the real request (few-shot): the tiny default teacher follows
# a shown format far more often than a described one. Their function is not offered.
FEW_SHOT = [
    {"role": "user", "content": "What is the weather in Paris and in Rome, in celsius?"},
    {"role": "assistant", "content":
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}</tool_call>'},
    {"role": "user", "content": "Write me a poem about the sea."},
    {"role": "assistant", "content": "None of the available functions can do that, sorry."},
]


def _show_call(call: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call["arguments"].items())
    return f"{call['name']}({args})"


def _clean_request(text: str) -> str:
    text = text.strip().split("\n\n")[0].strip()
    text = re.sub(r"^(message|request|user)\s*:\s*", "", text, flags=re.IGNORECASE).strip()
    return text.strip('"').strip()


def _stated(value: Any) -> str:
    """A value as a stated request writes it: scalars in the very form the request
    check looks for, lists item by item."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def stated_request(calls: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The request for a call set stated by code: each function's description (first
    sentence) with its values, one sentence per function, so every value is in it."""
    descriptions = {t["function"]["name"]: t["function"].get("description", "") for t in tools}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_name.setdefault(call["name"], []).append(call["arguments"])
    sentences = []
    for name, assignments in by_name.items():
        first = re.split(r"(?<=[.!?])\s+", descriptions[name].strip() or name.replace("_", " "))[0]
        what = first.rstrip(".!? ")
        values = [", ".join(f"{param.replace('_', ' ')} {_stated(v)}" for param, v in args.items())
                  for args in assignments]
        if len(values) == 1:
            sentences.append(f"{what}, with {values[0]}." if values[0] else f"{what}.")
        else:
            sentences.append(f"{what}, for each of these: {'; '.join(values)}.")
    sentences[1:] = [f"Also, {s[0].lower()}{s[1:]}" for s in sentences[1:]]
    return " ".join(sentences)


def write_requests(prompts: list[dict[str, Any]], engine, cfg: Config) -> None:
    """Give each call-set prompt its `request`: best of `request_n` teacher samples, the
    first that states every value (the validator's own check) and was not cut off;
    sample 0 when none does (the validator then rejects it)."""
    sampling = sampling_for(engine, temperature=0.7, max_tokens=cfg.request_max_tokens, n=cfg.request_n,
                            seed=cfg.seed)
    if cfg.requests == "paraphrase":
        for p in prompts:
            p["request_seed"] = stated_request(p["calls"], p["tools"])
        convs = [[*PARAPHRASE_SHOTS, {"role": "user", "content": PARAPHRASE_PROMPT.format(request=p["request_seed"])}]
                 for p in prompts]
    else:
        convs = [[{"role": "user", "content": REQUEST_PROMPT.format(
            calls="\n".join(_show_call(c) for c in p["calls"]))}] for p in prompts]
    for p, outs in zip(prompts, engine.chat(convs, sampling)):
        texts = [_clean_request(o.text) for o in outs]
        ok = [i for i, (t, o) in enumerate(zip(texts, outs))
              if t and o.finish_reason != "length" and _request_mentions(t, p["calls"])]
        pick = ok[0] if ok else 0
        p["request"] = texts[pick]
        p["request_meta"] = {"request_source": cfg.requests, "request_sample": pick,
                             "request_sampling": dataclasses.asdict(sampling),
                             **({"request_seed": p["request_seed"]} if "request_seed" in p else {})}


def code_answer(calls: list[dict[str, Any]]) -> str:
    """The sampled calls as the answer text a function-calling model writes."""
    return "".join(f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['arguments']}, ensure_ascii=False)}"
                   "</tool_call>" for c in calls)


def generate(prompts: list[dict[str, Any]], engine, cfg: Config) -> list[dict[str, Any]]:
    answer_sampling = sampling_for(engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.n,
                                   seed=cfg.seed)
    # Step (ii.a): the request for every sampled call set (bfcl and irrelevance: BFCL's question).
    write_requests([p for p in prompts if "request" not in p], engine, cfg)
    # Step (ii.b): the teacher answers each request with the tools in context; with
    # `answers: code` only the requests whose right answer is no call, unless
    # `irrelevance_answers: code` answers those too.
    asked = [p for p in prompts if (p["calls"] and cfg.answers != "code")
             or (not p["calls"] and cfg.irrelevance_answers == "teacher")]
    answer_convs = [[{"role": "system", "content": ANSWER_SYSTEM}, *FEW_SHOT,
                     {"role": "user", "content": p["request"]}] for p in asked]
    outs = engine.chat(answer_convs, answer_sampling, [p["tools"] for p in asked]) if asked else []
    teacher_answers = {p["id"]: samples for p, samples in zip(asked, outs)}
    candidates = []
    for p in prompts:
        base = {"seed_id": p["id"], "kind": p["kind"], "source": p["source"], "teacher": engine.model,
                "engine": engine.name, "expected_calls": json.dumps(p["calls"], sort_keys=True),
                **p.get("request_meta", {"request_source": "bfcl"}),
                **({"tools_source": p["tools_source"]} if "tools_source" in p else {})}
        answers = [(out.text, {"answer_source": "teacher", "sampling": dataclasses.asdict(answer_sampling)},
                    {"finish_reason": out.finish_reason, "tokens": out.tokens})
                   for out in teacher_answers.get(p["id"], [])]
        if p["calls"] and cfg.answers != "teacher":
            # After the teacher's samples: a teacher answer that matches comes first, and
            # the code's identical record is then counted as a duplicate sample.
            # `sampling` is the request's, the teacher's part of this record (none for bfcl).
            sampling = p.get("request_meta", {}).get("request_sampling")
            answers.append((code_answer(p["calls"]), {"answer_source": "code", "sampling": sampling}, None))
        if not p["calls"] and cfg.irrelevance_answers == "code":
            answers.append((REFUSAL, {"answer_source": "code", "sampling": None}, None))
        for j, (text, source, completion) in enumerate(answers):
            c = {"messages": [{"role": "user", "content": p["request"]}, {"role": "assistant", "content": text}],
                 "tools": p["tools"], "expected": p["calls"], "meta": {**base, **source, "sample": j}}
            if completion is not None:  # a code-built answer was not generated: nothing to cut off
                c["completion"] = completion
            candidates.append(c)
    return candidates


# ---------------------------------------------------------------------- (iii)
class TypeMismatch(ValueError):
    pass


def normalise(value: Any, spec: dict[str, Any] | None) -> Any:
    """A canonical form of `value` under its JSON-schema `spec`; TypeMismatch if the
    value cannot be of that type (e.g. "abc" for an integer)."""
    kind = (spec or {}).get("type")
    if kind == "integer":
        if isinstance(value, bool):
            raise TypeMismatch(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeMismatch(value) from None
        if number != int(number):
            raise TypeMismatch(value)
        return int(number)
    if kind == "number":
        if isinstance(value, bool):
            raise TypeMismatch(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeMismatch(value) from None
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise TypeMismatch(value)
    if kind == "string":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeMismatch(value)
        return " ".join(str(value).split()).casefold()
    if kind == "array":
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch(value)
        return tuple(normalise(v, spec.get("items")) for v in value)
    if kind == "object" or isinstance(value, dict):
        if not isinstance(value, dict):
            raise TypeMismatch(value)
        props = (spec or {}).get("properties", {})
        return tuple(sorted((k, normalise(v, props.get(k))) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(normalise(v, None) for v in value)
    return " ".join(value.split()).casefold() if isinstance(value, str) else value


def canonical_call(call: dict[str, Any], tools_by_name: dict[str, dict[str, Any]]) -> tuple:
    """(name, sorted normalised arguments), arguments equal to the schema default dropped."""
    params = tools_by_name.get(call["name"], {}).get("parameters", {})
    props = params.get("properties", {})
    out = []
    for key, value in call["arguments"].items():
        spec = props.get(key)
        norm = normalise(value, spec)
        if spec is not None and "default" in spec:
            try:
                if norm == normalise(spec["default"], spec):
                    continue
            except TypeMismatch:
                pass
        out.append((key, norm))
    return call["name"], tuple(sorted(out, key=lambda kv: kv[0]))


def match_calls(text: str, expected: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str | None:
    """None when the calls in `text` equal `expected` (as a multiset), else a reason code."""
    calls, errors = parse_tool_calls(text)
    if errors or ("<tool_call>" in text and not calls):
        return "malformed_call"
    if not expected:
        return "call_when_irrelevant" if calls else None
    if not calls:
        return "no_call"
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if any(c["name"] not in by_name for c in calls) or \
            {c["name"] for c in calls} != {c["name"] for c in expected}:
        return "wrong_function"
    try:
        got = Counter(canonical_call(c, by_name) for c in calls)
    except TypeMismatch:
        return "wrong_type"
    want = Counter(canonical_call(c, by_name) for c in expected)
    if got == want:
        return None
    if sum(got.values()) < sum(want.values()):
        return "missing_call"
    if sum(got.values()) > sum(want.values()):
        return "extra_call"
    return "wrong_arguments"


def _request_mentions(request: str, calls: list[dict[str, Any]]) -> bool:
    """Every scalar argument value appears in the request (a request that leaves a
    value out cannot be answered with the sampled call)."""
    text = request.casefold()
    for call in calls:
        for value in call["arguments"].values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, bool) or isinstance(v, dict):
                    continue
                shown = f"{v:g}" if isinstance(v, float) else str(v)
                if shown.casefold() not in text:
                    return False
    return True


def validate(candidates: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    for c in candidates:
        request = c["messages"][0]["content"]
        request_reason = None
        if not request.strip():
            request_reason = "empty_request"
        elif c["expected"] and not _request_mentions(request, c["expected"]):
            request_reason = "request_missing_value"
        malformed = rejected_if_malformed(c)
        c["validators"] = {"request": verdict(request_reason), "well_formed": verdict(malformed)}
        if not malformed:  # malformed output has no calls to compare
            c["validators"]["calls"] = verdict(match_calls(c["messages"][-1]["content"], c["expected"], c["tools"]))
        reason = c["reject_reason"] = first_failure(c["validators"])
        calls, errors = parse_tool_calls(c["messages"][-1]["content"])
        c["scores"] = {"calls_parsed": len(calls), "calls_malformed": len(errors),
                       "calls_expected": len(c["expected"]), "match": reason is None}
    return candidates


# ----------------------------------------------------------------------- (iv)
def calls_turn(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls as the assistant turn the record contract holds: structured `tool_calls`."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": call["name"],
                                          "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        for call in calls]}


def post_edit(c: dict[str, Any], cfg: Config) -> Record:
    meta = {**c["meta"], "scores": c["scores"], "validators": c["validators"]}
    user = c["messages"][0]
    if c["expected"]:
        # The sampled calls, schema-typed, replace the teacher's text (they matched it).
        answer = calls_turn(c["expected"])
        meta["post_edit"] = ["structured_tool_calls", "schema_typed_arguments"]
    else:
        answer = {"role": "assistant", "content": c["messages"][-1]["content"].strip()}
        meta["post_edit"] = ["strip_whitespace"]
    return make_record(NAME, [user, answer], meta, c["tools"])
