"""What a reviewer reads before judging: guidelines per pipeline, and what each question means.

Argilla shows a dataset's guidelines (markdown) in a panel beside every record and a
question's description next to it. One dataset per pipeline, so each pipeline's
guidelines say what to accept, what to reject and when to correct rather than reject,
for that pipeline's records; pairs get their own. Plain text, no HTML.
"""

from __future__ import annotations

_RECORDS_HEAD = """\
**Decide whether this example may train the model.** Train means: the model learns to
answer exactly like the final assistant turn, given everything before it.

- **Accept** when you would want the model to give this answer, word for word.
- **Reject** when it must not train: wrong, unsupported, broken, cut off, or the
  prompt itself is broken. Where several reviewers see a record and disagree, it goes
  to a *disputed* list that a lead resolves: answer what you see.
- **Correct rather than reject** when the answer is right in substance and a small
  edit fixes it (a wrong number, a missing unit, a stray fragment): type the whole
  final answer as it should read in *Corrected final answer* and accept. It replaces
  the answer exactly as typed.

The validators' verdict is pre-filled as a suggestion; *Automatic checks* shows each
check's result and reason. They are literal code: check them, do not trust them.
"""

_RECORDS = {
    "table_qa": """\
**Table QA.** The user turn is a paragraph that states a table's values (the table is
shown under *Table*), then a question: extraction (one cell), aggregation (max, min,
sum, count over rows) or attribution (which row).

- Accept: the answer is correct against the **table**, and the paragraph states the
  table's values faithfully.
- Reject: the paragraph drops or changes a value the question needs (even if the
  answer happens to be right); the question cannot be answered from the paragraph;
  the answer invents values.
- Correct: the question is sound but the answer's value is wrong or incomplete, or it
  is padded with repetition.
""",
    "doc_qa": """\
**Document QA.** The user turn holds a document (long ones are embedded among other,
similar texts), then questions. *Passage* quotes the sentence the answer rests on and
says which paragraph it is in; *Source document* is the document itself.

- Accept: the answer is supported by the quoted passage and answers the question.
- Reject: the answer is not in the document, copies the question, or answers another
  question; the question is ambiguous or needs outside knowledge.
- Correct: the answer is grounded but badly formed (too long, repeats the question,
  trails off).
""",
    "tool_use": """\
**Tool use.** *Tools offered* lists the functions the assistant may call. An answer is
either calls (shown as `→ call name({arguments})`) or text. *Automatic checks* lists
the calls the request was written for.

- Accept: the calls are exactly what the request asks for: right functions, every
  argument value stated in (or implied by) the request, nothing invented. For a
  request no tool can serve, accept only a short refusal with no call.
- Reject: a wrong function, an invented or missing argument value, a call where none
  fits, or a request that does not state the values the call uses.
- Correct: text answers only. A wrong call cannot be fixed in the text box (a typed
  correction becomes plain text): reject it instead.
""",
    "steerability": """\
**Steerability.** The prompt (or the system message, for conversations) carries
instructions that code can check. *Automatic checks* lists each constraint with its
verdict.

- Accept: the answer follows every instruction and is a sensible answer to the task.
- Reject: it breaks any instruction, even one the code passed (the checks are
  literal: a "3 bullet points" check cannot tell bullets from a list of fragments);
  it is off topic, incoherent or cut off.
- Correct: a small edit makes it follow the instructions (drop a forbidden word, trim
  to the word limit, fill a placeholder).
""",
    "needle": """\
**Long-context retrieval (needle).** Filler text hides one or more "special magic
numbers"; *Passage* lists them. The question asks for one of them. These answers are
written by code, so a reject should be rare.

- Accept: the answer gives the value asked for.
- Reject: the question is ambiguous (two needles with the same key), or the filler
  states a different value for the key.
- Correct: not expected; reject instead if something is wrong.
""",
    "chat": """\
**General conversation.** Keeps the model a good general assistant while it learns
skills.

- Accept: helpful, correct, complete (not cut off), safe.
- Reject: truncated mid-sentence, repetitive, wrong, evasive or unsafe.
- Correct: fix a small factual slip or cut a trailing fragment.
""",
}

_RECORDS_OTHER = """\
Judge the final assistant turn against the conversation and the source, where there
is one.
"""

RECORD_QUESTIONS = {
    "verdict": "accept: may train as shown (or as you corrected it). reject: must not train."
               " Pre-filled with the validators' verdict: check it.",
    "quality": "How good the final answer is, whatever the verdict: 1 wrong or broken, 3 acceptable,"
               " 5 could not be better. Optional.",
    "corrected_answer": "The whole final assistant turn as it should read. It replaces the answer exactly"
                        " as typed. Leave empty when nothing needs correcting; accept as well.",
}

_PAIRS_HEAD = """\
**Decide whether this preference pair may train the model** (DPO: the model learns to
prefer *Chosen* over *Rejected*, given *Prompt*). Code ranked them: *What the
validators checked* shows on what.

- **Accept** when Chosen is a good answer and clearly better than Rejected.
- **Reject** when the pair should not train: both bad, both fine, or the prompt is
  broken. Disagreements between reviewers go to a *disputed* list.
- **Swap** (and accept) when Rejected is actually the better answer: the pair then
  trains the other way round.
"""

_PAIRS = {
    "steerability": """\
**Steerability pairs.** Chosen passed the constraints, Rejected failed one. Accept if
Chosen really follows every instruction and Rejected really breaks one.
""",
    "tool_use": """\
**Tool-use pairs.** Chosen's calls matched the request, Rejected's did not. Accept if
Chosen's calls are exactly right and Rejected's are wrong; reject if both are wrong.
""",
}

PAIR_QUESTIONS = {
    "verdict": "accept: may train as ranked (or swapped, if you answer swap). reject: must not train.",
    "swap": "keep: Chosen is better, as code ranked it. swap: Rejected is better; the pair trains reversed.",
}


def record_guidelines(pipeline: str) -> str:
    return (_RECORDS.get(pipeline, _RECORDS_OTHER) + "\n" + _RECORDS_HEAD).strip()  # as the server keeps it


def pair_guidelines(pipeline: str) -> str:
    return (_PAIRS.get(pipeline, "") + "\n" + _PAIRS_HEAD).strip()
