"""Document QA: the teacher writes a question and its answer over one or several
paragraphs of real text (gensim's Lee news corpus, Python's reference topics). The
long-context variant embeds the whole gold document among the most similar other
documents (TF-IDF cosine) until the record fills a length bucket measured in student
tokens, and the answer names the document that supports it.

(i)   sample_prompts: a document, 1..max_paragraphs consecutive paragraphs, the one
      paragraph the question must be about; for long items a bucket and the
      distractor documents that fill it (seeded)
      (answer_first, the default: also a name or number in it as the answer)
(ii)  generate: the teacher writes "Question: ...\\nAnswer: ..." (answer_first: the
      question for the given answer); one worked example steers a small teacher
(iii) validate: parseable, a question, grounded (most of the answer's content words
      occur in the cited paragraph; answer_first: the question's words come from
      the answer's sentence), non-trivial (the answer is not just words of the
      question / the question does not contain its answer), no loops; long items:
      the final record's token count inside its bucket
(iv)  post_edit: tidy the answer; short items cite the paragraph when there are
      several, long items end with "Source: document <id>."
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from typing import Any, Literal

from pydantic import Field

from pipeline.recipe import RecipeError, Section
from pipeline.contract import Record, make_record
from pipeline import sources
from synth_data.chat import repeated_lines, repetition, strip_label
from pipeline.engines import sampling_for
from synth_data.four_steps import candidate, first_failure, rejected_if_malformed, verdict

NAME = "doc_qa"
REJECT_REASONS = (
    "empty", "truncated", "unparseable", "not_a_question", "ungrounded", "trivial",
    "degenerate_repetition", "out_of_bucket", "wrong_answer_type",
)


class Config(Section):
    count: int = Field(8, ge=0)
    sources: list[Literal["lee", "pydoc"]] = Field(default_factory=lambda: ["lee"])
    max_paragraphs: int = Field(2, ge=1)  # paragraphs shown to the teacher
    sentences_per_paragraph: int = Field(3, ge=1)
    # Long-context variant: buckets in student tokens; a record of bucket b has
    # (previous bucket, b] tokens (the smallest: (b/2, b]).
    length_buckets: list[int] = Field(default_factory=lambda: [1024, 2048, 4096, 8192])
    long_fraction: float = Field(0.5, ge=0, le=1)  # share of items embedded in long context
    reserve_tokens: int = Field(192, gt=0)  # room left for the question and answer
    min_grounding: float = Field(0.75, gt=0, le=1)
    # teacher: the teacher writes question and answer (for capable teachers).
    # answer_first: code picks an answer span (a name or a number) in the cited
    # paragraph and the teacher writes the question for it: a 135M teacher invents
    # answers but can phrase questions. The answer is then extractive by construction.
    # cloze: answer_first, but the teacher sees only the answer's sentence with the
    # span blanked out, so it cannot copy the answer into the question (what most
    # answer_first questions of a 135M teacher are rejected for, as trivial).
    questions: Literal["teacher", "answer_first", "cloze"] = "answer_first"
    n: int = Field(1, ge=1)
    temperature: float = 0.5
    max_tokens: int = Field(96, gt=0)
    seed: int = 0


# ------------------------------------------------------------------- long context
@functools.cache
def _pool(names: tuple[str, ...]):
    """Documents of the sources with a TF-IDF matrix (rows L2-normalised)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = sources.documents(list(names))
    matrix = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit_transform(d["text"] for d in docs)
    return docs, matrix


def similar(names: tuple[str, ...], index: int) -> list[int]:
    """Other documents, most similar to document `index` first."""
    docs, matrix = _pool(names)
    sims = (matrix @ matrix[index].T).toarray().ravel()
    return [i for i in sorted(range(len(docs)), key=lambda i: -sims[i]) if i != index]


def doc_block(doc: dict[str, str]) -> str:
    return f"Document {doc['id']}:\n{doc['text']}"


@functools.cache
def _block_tokens(doc_id: str, text: str) -> int:
    return sources.count_tokens(doc_block({"id": doc_id, "text": text})) + 2  # + "\n\n"


def pack_context(names: tuple[str, ...], gold: int, bucket: int, cfg: Config, rng: random.Random) -> list[str]:
    """Gold + the most similar documents that fit the bucket (less the reserve), in a
    seeded order. Raises if the sources cannot fill the bucket's lower bound."""
    docs, _ = _pool(names)
    lower, upper = sources.bucket_bounds(cfg.length_buckets)[bucket]
    budget = upper - cfg.reserve_tokens - 64  # 64: the instruction and chat markup
    used = _block_tokens(docs[gold]["id"], docs[gold]["text"])
    chosen = [gold]
    for i in similar(names, gold):
        t = _block_tokens(docs[i]["id"], docs[i]["text"])
        if used + t <= budget:
            chosen.append(i)
            used += t
    if used <= lower:
        raise RecipeError(
            f"generate.doc_qa.length_buckets: sources {list(names)} hold ~{used} tokens around "
            f"{docs[gold]['id']}, too little for bucket {bucket} ({lower}, {upper}]; add sources or "
            "change the buckets"
        )
    rng.shuffle(chosen)
    return [docs[i]["id"] for i in chosen]


# ------------------------------------------------------------------- answer spans
SPAN = re.compile(
    r"(?<!^)(?<![.!?] )\b(?:[A-Z][a-z]+(?:[ -](?:of |the |de )?[A-Z][a-z]+)+)"  # a multi-word name
    r"|(?<![:\d.,])\b\d[\d,.]*\d?(?:-year-old| per cent| percent| kilometres| metres| hectares| million| billion"
    r"| people| years| days| hours| weeks| months| dollars)?"  # a number, with its unit
)


def answer_spans(paragraph: str) -> list[tuple[str, str]]:
    """(span, its sentence) pairs a question can be asked about."""
    out = []
    for sentence in sources.sentences(paragraph):
        for match in SPAN.finditer(sentence):
            span = match.group(0).strip(" ,.")
            if len(span) >= 2:  # single digits are too easy to hit by chance
                out.append((span, sentence))
    return out


# --------------------------------------------------------------------- the steps
def sample_prompts(cfg: Config, rng: random.Random) -> list[dict[str, Any]]:
    names = tuple(cfg.sources)
    docs, _ = _pool(names)
    prompts, long_items, attempts = [], 0, 0
    while len(prompts) < cfg.count:
        attempts += 1
        if attempts > 20 * cfg.count + 100:
            raise ValueError(f"doc_qa: sources {list(names)} offer too few paragraphs to ask about")
        gold = rng.randrange(len(docs))
        paras = sources.paragraphs(docs[gold]["text"], cfg.sentences_per_paragraph)
        if not paras:
            continue
        k = rng.randint(1, min(cfg.max_paragraphs, len(paras)))
        start = rng.randrange(len(paras) - k + 1)
        prompt = {
            "doc_id": docs[gold]["id"], "paragraphs": paras[start : start + k],
            "paragraph_ids": list(range(start, start + k)), "cited": rng.randrange(k),
        }
        if cfg.questions in ("answer_first", "cloze"):
            spans = answer_spans(prompt["paragraphs"][prompt["cited"]])
            if not spans:  # nothing to ask about in this paragraph: draw again
                continue
            prompt["span"], prompt["span_sentence"] = rng.choice(spans)
            prompt["cloze"] = cfg.questions == "cloze"
        if cfg.length_buckets and rng.random() < cfg.long_fraction:
            bucket = sorted(cfg.length_buckets)[long_items % len(cfg.length_buckets)]
            long_items += 1
            prompt["length_bucket"] = bucket
            prompt["context_ids"] = pack_context(names, gold, bucket, cfg, rng)
        prompts.append(prompt)
    return prompts


EXAMPLE = (
    "The city council approved a new bridge over the river on Monday. "
    "Building work will start in March and should take two years. The bridge will cost 40 million dollars."
)
EXAMPLE_QA = "Question: How long should the building work on the new bridge take?\nAnswer: Two years."
EXAMPLE_SPAN, EXAMPLE_QUESTION = "40 million dollars", "Question: How much will the new bridge cost?"


def cloze_instruction(span: str, sentence: str) -> str:
    blanked = sentence.replace(span, "___")
    kind = "a number" if span[0].isdigit() else "a name"
    return (f"Sentence: \"{blanked}\"\nWrite one question about this sentence whose answer is the"
            f" missing part ___ ({kind}). Use the form:\nQuestion: ...")


def instruction(prompt: dict[str, Any]) -> str:
    if prompt.get("cloze"):
        return cloze_instruction(prompt["span"], prompt["span_sentence"])
    paragraphs, cited = prompt["paragraphs"], prompt["cited"]
    shown = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paragraphs))
    if "span" in prompt:
        # Naming the sentence keeps a small teacher's question on it.
        return (f"{shown}\n\nParagraph {cited + 1} says: \"{prompt['span_sentence']}\"\n"
                f"Write one question about this sentence whose answer is \"{prompt['span']}\"."
                f" Do not put \"{prompt['span']}\" in the question. Use the form:\nQuestion: ...")
    return (f"{shown}\n\nWrite one question about paragraph {cited + 1} and its short answer,"
            " copied from that paragraph. Use the form:\nQuestion: ...\nAnswer: ...")


def conversation(prompt: dict[str, Any]) -> list[dict[str, str]]:
    example = {"paragraphs": [EXAMPLE], "cited": 0, "cloze": prompt.get("cloze", False)}
    if "span" in prompt:
        example.update(span=EXAMPLE_SPAN, span_sentence=sources.sentences(EXAMPLE)[-1])
    return [
        {"role": "user", "content": instruction(example)},
        {"role": "assistant", "content": EXAMPLE_QUESTION if "span" in prompt else EXAMPLE_QA},
        {"role": "user", "content": instruction(prompt)},
    ]


def generate(prompts, engine, cfg: Config) -> list[dict[str, Any]]:
    # The recipe's teacher.sampling (top_p, ...) under this pipeline's own settings.
    sampling = sampling_for(engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.n, seed=cfg.seed)
    convs = [conversation(p) for p in prompts]
    outs = engine.chat(convs, sampling) if convs else []
    cands = []
    for p, conv, completions in zip(prompts, convs, outs):
        for k, comp in enumerate(completions):
            meta = {
                "seed_ids": {"doc_id": p["doc_id"], "paragraphs": p["paragraph_ids"],
                             "cited_paragraph": p["paragraph_ids"][p["cited"]]},
                "paragraphs": p["paragraphs"], "cited": p["cited"],
                **({"span": p["span"], "span_sentence": p["span_sentence"]} if "span" in p else {}),
                "source": "\n\n".join(p["paragraphs"]), "sample": k,
                "teacher": engine.model, "sampling": dataclasses.asdict(sampling),
                # The question is always the teacher's; the answer is its too, or a span code picked.
                "questions": cfg.questions, "answer_source": "code" if "span" in p else "teacher",
            }
            if "length_bucket" in p:
                meta["length_bucket"] = p["length_bucket"]
                meta["context_ids"] = p["context_ids"]
            cands.append(candidate(conv, comp, meta))
    return cands


QA_RE = re.compile(r"Question\s*:\s*(?P<q>.+?)\s*\n+\s*Answer\s*:\s*(?P<a>[^\n]+)", re.IGNORECASE | re.DOTALL)
STOPWORDS = frozenset(
    "a an the of to in on at for by with from and or but is are was were be been it its this that these"
    " those as he she they we you i his her their our your what which who whom whose when where why how"
    " does do did has have had not no will would can could should may might there than then so about".split()
)


def parse_qa(text: str) -> tuple[str, str] | None:
    match = QA_RE.search(text)
    if not match:
        return None
    question = " ".join(match["q"].split())
    answer = match["a"].strip().strip("\"'").strip()
    return (question, answer) if question and answer else None


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS}


def check_qa(text: str, paragraph: str, cfg: Config) -> tuple[str | None, dict[str, Any], tuple[str, str] | None]:
    body, _ = strip_label(text)
    scores: dict[str, Any] = {"repetition": repetition(body)}
    if scores["repetition"] > 0.3 or repeated_lines(body) >= 3:
        return "degenerate_repetition", scores, None
    qa = parse_qa(body)
    if qa is None:
        return "unparseable", scores, None
    question, answer = qa
    answer_words, para_words = content_words(answer), content_words(paragraph)
    scores["grounding"] = round(len(answer_words & para_words) / max(len(answer_words), 1), 4)
    scores["answer_in_question"] = round(
        len(answer_words & content_words(question)) / max(len(answer_words), 1), 4)
    if not question.endswith("?"):
        return "not_a_question", scores, qa
    if not answer_words or scores["answer_in_question"] == 1.0:
        return "trivial", scores, qa
    if scores["grounding"] < cfg.min_grounding:
        return "ungrounded", scores, qa
    return None, scores, qa


QUESTION_RE = re.compile(r"^\s*(?:question\s*:\s*)?(?P<q>[^\n]*?\?)", re.IGNORECASE | re.MULTILINE)
# The question's content words found in the answer's sentence: at least this share,
# and at least two of them ("What is the capital of Australia?" shares one word).
QUESTION_GROUNDING = 0.6
NUMBER_QUESTION = re.compile(r"\b(how|when|year|per ?cent|percentage|number|age)\b", re.IGNORECASE)


def answer_type_fits(question: str, span: str) -> bool:
    """A number answers how/when questions; a name answers who/what/where/which."""
    if span[0].isdigit():
        return NUMBER_QUESTION.search(question) is not None
    return re.match(r"\s*(how (many|much|long|old|far)|when)\b", question, re.IGNORECASE) is None


def check_question(text: str, span: str, sentence: str) -> tuple[str | None, dict[str, Any], tuple[str, str] | None]:
    """answer_first: the teacher's question for a known answer span."""
    body, _ = strip_label(text)
    scores: dict[str, Any] = {"repetition": repetition(body)}
    if scores["repetition"] > 0.3 or repeated_lines(body) >= 3:
        return "degenerate_repetition", scores, None
    match = QUESTION_RE.search(body)
    if not match or len(content_words(match["q"])) < 2:
        return "not_a_question", scores, None
    question = " ".join(match["q"].split())
    qa = (question, span)
    q_words = content_words(question)
    shared = len(q_words & content_words(sentence))
    scores["grounding"] = round(shared / max(len(q_words), 1), 4)
    if content_words(span) <= q_words:
        return "trivial", scores, qa  # the question gives its answer away ("Who is Mr. Arafat?")
    if scores["grounding"] < QUESTION_GROUNDING or shared < 2:
        return "ungrounded", scores, qa
    if not answer_type_fits(question, span):
        return "wrong_answer_type", scores, qa
    return None, scores, qa


def tidy_answer(answer: str) -> str:
    answer = answer[0].upper() + answer[1:]
    return answer if answer[-1] in ".!?" else answer + "."


def record_messages(meta: dict[str, Any], question: str, answer: str) -> list[dict[str, str]]:
    answer = tidy_answer(answer)
    if "length_bucket" in meta:
        docs = {d["id"]: d for d in sources.documents(_source_names(meta))}
        context = "\n\n".join(doc_block(docs[i]) for i in meta["context_ids"])
        user = (f"{context}\n\nQuestion: {question}\n"
                "Answer the question and name the document that supports the answer.")
        reply = f"{answer}\n\nSource: document {meta['seed_ids']['doc_id']}."
    else:
        paras = meta["paragraphs"]
        if len(paras) == 1:
            user, reply = f"{paras[0]}\n\nQuestion: {question}", answer
        else:
            shown = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paras))
            user = f"{shown}\n\nQuestion: {question}\nSay which paragraph supports the answer."
            reply = f"{answer.rstrip('.')} (paragraph {meta['cited'] + 1})."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _source_names(meta: dict[str, Any]) -> list[str]:
    return sorted({i.split("-", 1)[0] for i in meta["context_ids"]})


def validate(candidates, cfg: Config) -> list[dict[str, Any]]:
    for c in candidates:
        meta = c["meta"]
        cited = meta["paragraphs"][meta["cited"]]
        if "span" in meta:
            reason, c["scores"], qa = check_question(c["messages"][-1]["content"], meta["span"], meta["span_sentence"])
        else:
            reason, c["scores"], qa = check_qa(c["messages"][-1]["content"], cited, cfg)
        # The QA pair's grade: how well it is grounded in the cited text.
        c["validators"] = {"well_formed": verdict(rejected_if_malformed(c)),
                           "qa": verdict(reason, c["scores"].get("grounding"))}
        c["reject_reason"] = first_failure(c["validators"])
        if c["reject_reason"] is None and "length_bucket" in meta:
            c["qa"] = qa
            tokens = sources.conversation_tokens(record_messages(meta, *qa))
            lower, upper = sources.bucket_bounds(cfg.length_buckets)[meta["length_bucket"]]
            c["scores"]["tokens"] = tokens
            c["validators"]["length_bucket"] = verdict(None if lower < tokens <= upper else "out_of_bucket")
            c["reject_reason"] = first_failure(c["validators"])
        elif qa is not None:
            c["qa"] = qa
    return candidates


def post_edit(c: dict[str, Any], cfg: Config) -> Record:
    question, answer = c["qa"]
    messages = record_messages(c["meta"], question, answer)
    actions = ["extract_qa"]
    if tidy_answer(answer) != answer:
        actions.append("tidy_answer")
    meta = {**c["meta"], "question": question, "answer": answer, "scores": c["scores"], "post_edit": actions,
            "validators": c["validators"]}
    if "length_bucket" in meta:
        meta["tokens"] = c["scores"]["tokens"]
    return make_record(NAME, messages, meta)
