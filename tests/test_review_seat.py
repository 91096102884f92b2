"""The reviewer's seat: what the pipelines really wrote, read as a reviewer reads it (a
real local Argilla server, headless Chromium), and what comes back from reviewers.

- Every pipeline's record shows, on its annotation page, what a reviewer must judge:
  the final answer; tool calls (name, arguments) and tool results; the table as a
  table; the document with the passage the answer rests on; each constraint's
  verdict; the validators' verdict and reasons; and the pipeline's own guidelines.
  One screenshot per pipeline is saved under outputs/test-artifacts/.
- Markup-shaped text (`<tool_call>`, `<b>`, a lone `<`) reaches the page intact in
  every field, for records and for pairs, and a correction typed in the browser comes
  back through pull byte for byte.
- With several reviewers per record: a decision needs `review.min_submitted`
  reviewers, disagreements go to the disputed bucket, pull reports Fleiss' kappa,
  every record still ends in exactly one bucket, and the summary shows it.
- A 256K-token document is pushed shortened for display, says so, and comes back whole.
- A server killed mid-push loses nothing: rerunning push adds only what is missing.

One server and one logged-in browser for the module; records come from the session's
real pipeline outputs (tests/conftest.py) and prefs' real pairs (tests/test_prefs.py).
"""

import argparse
import copy
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_prefs import prefs_run  # noqa: F401  (a fixture)
from test_review import ARTIFACTS, argilla, args, free_port, prefix, recipe, sdk, submit, write_inputs  # noqa: F401

from pipeline.contract import check_record, make_record, read_records
from pipeline.records import read_json, read_jsonl, write_jsonl
from review import pairs, pull, push, server
from review.dataset import render_conversation

pytestmark = [
    pytest.mark.slow,  # the session's teacher-generated records
    pytest.mark.skipif(not (server.SERVER_VENV / "bin" / "python").exists(),
                       reason=".venv-argilla missing: run `make setup`"),
]
PIPELINES = ("table_qa", "doc_qa", "tool_use", "steerability", "needle", "chat")
MARKUP = "<tool_call>{\"name\": \"x\"}</tool_call> <b>bold?</b> a < b && c > d *not italic* $1$ | cell"
REPO = Path(__file__).resolve().parents[1]


def words(text: str) -> str:
    """Text with runs of whitespace as one space: the page wraps lines as it likes."""
    return " ".join(text.split())


# --------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def reviewer(argilla, tmp_path_factory):  # noqa: F811
    """Headless Debian Chromium, logged in as the server's owner, for the whole module."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("chromium + chromium-driver not installed (CI installs them with apt)")
    from selenium import webdriver

    conn, state = argilla
    creds = json.loads((state / "credentials.json").read_text())
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    page = Page(driver, conn.api_url)
    try:
        page.log_in(creds["username"], creds["password"])
        yield page
    finally:
        driver.quit()


class Page:
    """The annotation page as a reviewer sees it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.wait = driver, url, WebDriverWait(driver, 60)

    def visible(self, css: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        return self.wait.until(EC.visibility_of_any_elements_located((By.CSS_SELECTOR, css)))[0]

    def log_in(self, username: str, password: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        self.driver.get(f"{self.url}/sign-in")
        self.visible("input[name=Username]").send_keys(username)
        self.visible("input[name=Password]").send_keys(password)
        self.visible("button[type=submit]").click()
        self.wait.until(lambda driver: "sign-in" not in driver.current_url)

    def open(self, dataset, expect: str) -> None:
        """The dataset's annotation page, once `expect` (text of its first record) shows."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        self.driver.get(f"{self.url}/dataset/{dataset.id}/annotation-mode")
        self.visible("label[for=verdict_accept]")
        self.wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), expect))

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def field(self, dataset, name: str):
        """The element holding one field's content (its id is field id + record id)."""
        from selenium.webdriver.common.by import By

        field_id = next(f.id for f in dataset.settings.fields if f.name == name)
        return self.driver.find_element(By.CSS_SELECTOR, f"[id^='fields-content-{field_id}-']")

    def tables(self, dataset, name: str) -> list[list[list[str]]]:
        """Every HTML table in a field, as rows of cell texts (header row first)."""
        from selenium.webdriver.common.by import By

        return [[[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
                 for row in table.find_elements(By.TAG_NAME, "tr")]
                for table in self.field(dataset, name).find_elements(By.TAG_NAME, "table")]

    def guidelines(self) -> str:
        """The guidelines panel's text, opened from the bottom bar."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        opener = self.wait.until(EC.element_to_be_clickable(
            (By.XPATH, "//*[translate(normalize-space(text()), 'guidelines', 'GUIDELINES')='GUIDELINES']")))
        opener.click()
        time.sleep(1)
        return self.text()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        assert self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
        return path


# --------------------------------------------------------------------- records
@pytest.fixture(scope="module")
def real_records(pipeline_outputs):
    """pipeline -> every record it wrote (accepted first, then rejected), as written."""
    found = {}
    for pipeline in PIPELINES:
        records = [r for part in ("accepted", "rejected")
                   for r in (x.dump() for x in read_records(pipeline_outputs / pipeline / f"{part}.jsonl"))]
        assert records, f"{pipeline} wrote no records"
        found[pipeline] = records
    return found


def shown_record(pipeline: str, records: list[dict]) -> dict:
    """The record a reviewer of this pipeline most needs to read: tool use's with calls
    (structured, or the teacher's own <tool_call> text), else the first written."""
    if pipeline == "tool_use":
        for record in records:
            if record["messages"][-1].get("tool_calls") or "<tool_call>" in (record["messages"][-1]["content"] or ""):
                return record
    return records[0]


def push_one(tmp_path, records: list[dict], **review) -> str:
    """Push records into fresh datasets; returns the dataset prefix."""
    name = prefix()
    folder = tmp_path / name
    path = recipe(folder if folder.mkdir() is None else folder, mode="server", dataset_prefix=name, **review)
    assert push.main(args(path, write_inputs(folder, records))) == 0
    return name


def final_answer(record: dict) -> str:
    return render_conversation(check_record(record).messages)[-1]["content"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipelines_record_shows_what_a_reviewer_must_judge(pipeline, argilla, sdk, reviewer, real_records,  # noqa: F811
                                                                 tmp_path):
    from pipeline.chat_template import parse_tool_calls

    record = shown_record(pipeline, real_records[pipeline])
    meta = record["meta"]
    name = push_one(tmp_path, [record])
    dataset = sdk.datasets(f"{name}-{pipeline}", workspace="posttrain")
    answer = final_answer(record)
    reviewer.open(dataset, answer.split("\n")[0][:60])
    page = words(reviewer.text())

    # Every turn, the final answer included, as written.
    for turn in render_conversation(check_record(record).messages):
        assert words(turn["content"]) in page, turn
    # The validators' verdict, and every check's result and reason, in one table row each.
    verdict = "reject" if any(not v["passed"] for v in meta["validators"].values()) else "accept"
    assert f"Validators' verdict: {verdict}" in page
    checks = reviewer.tables(dataset, "checks")
    rows = {row[0]: row for row in checks[0][1:]}
    for check, result in meta["validators"].items():
        assert rows[check][1] == ("pass" if result["passed"] else "FAIL"), (check, rows[check])
        assert rows[check][3] == (result["reason"] or ""), (check, rows[check])

    if pipeline == "table_qa":  # the table as a table: the source's cells, row by row
        source = [[c.strip() for c in line.strip().strip("|").split("|")] for line in meta["source"].splitlines()]
        [table] = reviewer.tables(dataset, "table")
        assert table == [source[0]] + source[2:]
    if pipeline == "doc_qa":  # the document, and the sentence the answer rests on, findable in it
        document = words(reviewer.field(dataset, "source").text)
        passage = words(reviewer.field(dataset, "passage").text)
        assert words(meta["source"]) == document
        assert words(meta["span_sentence"]) in passage and words(meta["span_sentence"]) in document
        assert f"paragraph {meta['cited'] + 1} of {len(meta['paragraphs'])}" in passage
    if pipeline == "tool_use":  # the tools offered; each call's function and arguments
        for tool in record["tools"]:
            assert f'"name": "{tool["function"]["name"]}"' in page
        final = record["messages"][-1]
        calls = [c["function"] for c in final.get("tool_calls") or []]
        calls += [{"name": c["name"], "arguments": json.dumps(c["arguments"])}
                  for c in parse_tool_calls(final.get("content") or "")[0]]
        assert calls, "the tool-use record shown has no call"
        for call in calls:
            assert call["name"] in page
            for key, value in json.loads(call["arguments"]).items():
                assert json.dumps(key) in page and json.dumps(value) in page
        assert "Calls the request was written for" in page
    if pipeline == "steerability":  # each constraint, its arguments and its verdict
        [constraints] = [t for t in checks if t[0] == ["constraint", "arguments", "result"]]
        assert len(constraints) - 1 == len(meta["constraints"])
        for row, constraint in zip(constraints[1:], meta["constraints"]):
            passed = meta["validators"][f"constraint_{constraint['kind']}"]["passed"]
            assert row[0] == constraint["kind"] and row[2] == ("pass" if passed else "FAIL")
            for value in constraint["args"].values():
                assert json.dumps(value, ensure_ascii=False) in row[1]
    if pipeline == "needle":  # the hidden needles, and the key asked for
        passage = words(reviewer.field(dataset, "passage").text)
        for needle in meta["needles"]:
            assert needle["key"] in passage and needle["value"] in passage
        assert meta["query"] in page

    reviewer.screenshot(f"review-{pipeline}.png")
    # The pipeline's own guidelines: what to accept, what to reject, when to correct.
    guidelines = words(reviewer.guidelines())
    title = re.match(r"\*\*(.+?)\*\*", dataset.settings.guidelines)[1]  # "Table QA.", "Tool use.", ...
    assert title in guidelines and "Decide whether this example may train the model." in guidelines
    for word in ("Accept:", "Reject:", "Correct:", "Correct rather than reject"):
        assert word in guidelines, word
    assert {q.name: bool(q.description) for q in dataset.settings.questions} == {
        "verdict": True, "quality": True, "corrected_answer": True}


def with_markup(records: dict[str, list[dict]]) -> list[dict]:
    """Real records with markup-shaped text planted in every field a reviewer reads,
    rebuilt through the record contract (so their ids are their own)."""
    out = []
    table = copy.deepcopy(records["table_qa"][0])
    table["messages"][0]["content"] += f" {MARKUP}"
    table["messages"][-1]["content"] = f"{table['messages'][-1]['content']} {MARKUP}"
    lines = table["meta"]["source"].splitlines()
    table["meta"]["source"] = "\n".join(lines[:2] + [lines[2].replace(" |", " <b>bold?</b> a < b |", 1)] + lines[3:])
    table["meta"]["validators"]["markup <check>"] = {"passed": False, "reason": "<b>why</b> < this"}
    out.append(table)
    doc = copy.deepcopy(records["doc_qa"][0])
    doc["meta"]["source"] = doc["meta"]["source"] + f" {MARKUP}"
    doc["meta"]["span_sentence"] = f"{doc['meta']['span_sentence']} {MARKUP}"
    out.append(doc)
    tool = copy.deepcopy(records["tool_use"][0])
    function = tool["tools"][0]["function"]
    function["description"] += f" {MARKUP}"
    call = {"type": "function", "id": "call_0", "function": {
        "name": function["name"], "arguments": json.dumps({"text": MARKUP, "n": 2})}}
    tool["messages"][1:] = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "name": function["name"], "content": f"result {MARKUP}"},
        {"role": "assistant", "content": f"Done: {MARKUP}"},
    ]
    out.append(tool)
    steer = copy.deepcopy(records["steerability"][0])
    steer["meta"]["constraints"].append({"kind": "exclude_keywords", "args": {"keywords": ["<b>", "a < b"]}})
    out.append(steer)
    return [make_record(r["pipeline"], r["messages"], r["meta"], r.get("tools")).dump() for r in out]


def test_markup_reaches_the_page_intact_and_a_typed_correction_comes_back_byte_identical(
    argilla, sdk, reviewer, real_records, tmp_path,  # noqa: F811
):
    from selenium.webdriver.common.by import By

    records = with_markup(real_records)
    name = push_one(tmp_path, records, unreviewed="pending")
    for record in records:
        dataset = sdk.datasets(f"{name}-{record['pipeline']}", workspace="posttrain")
        reviewer.open(dataset, words(final_answer(record))[:40])
        page = words(reviewer.text())
        assert page.count(words(MARKUP)) >= {"table_qa": 2, "doc_qa": 2, "tool_use": 2, "steerability": 0}[
            record["pipeline"]], record["pipeline"]
        if record["pipeline"] == "table_qa":
            [table] = reviewer.tables(dataset, "table")
            assert "<b>bold?</b> a < b" in " ".join(table[1])
            row = next(r for r in reviewer.tables(dataset, "checks")[0] if r[0] == "markup <check>")
            assert row[1:] == ["FAIL", "", "<b>why</b> < this"]
        if record["pipeline"] == "tool_use":
            assert f"→ call {record['messages'][1]['tool_calls'][0]['function']['name']}(" in page
            assert words(json.dumps(MARKUP))[1:-1] in page  # the argument, JSON-escaped as the call holds it
            assert f"[result of {record['messages'][2]['name']}] result {words(MARKUP)}" in page
        if record["pipeline"] == "steerability":
            row = [r for r in reviewer.tables(dataset, "checks")[1] if r[0] == "exclude_keywords"][-1]
            assert row[1] == 'keywords: ["<b>", "a < b"]'
    reviewer.screenshot("review-markup.png")

    # A reviewer types a correction full of markup into the table QA record and accepts.
    table = records[0]
    dataset = sdk.datasets(f"{name}-table_qa", workspace="posttrain")
    reviewer.open(dataset, words(final_answer(table))[:40])
    typed = 'It is <b>1.82</b> < 2 && "<tool_call>" stays  literal: $x$ *y* | z'
    reviewer.visible("label[for=verdict_accept]").click()
    box = reviewer.visible("[aria-label='Question: corrected_answer'] [contenteditable=true]")
    box.click()
    box.send_keys(typed)
    reviewer.visible("button.button--submit").click()
    reviewer.wait.until(lambda d: "Submitted\n1" in d.find_element(By.TAG_NAME, "body").text)

    out = tmp_path / "review"
    path = recipe(tmp_path, mode="server", dataset_prefix=name, unreviewed="pending")
    assert pull.main(args(path, write_inputs(tmp_path / "again", records), out)) == 0
    [corrected] = read_jsonl(out / "reviewed.jsonl")
    assert corrected["id"] == table["id"] and corrected["meta"]["review"]["decision"] == "corrected"
    assert corrected["messages"][-1] == {"role": "assistant", "content": typed}
    assert corrected["meta"]["review"]["original_final_turn"] == table["messages"][-1]


def test_pairs_show_markup_intact_in_every_field(argilla, sdk, reviewer, prefs_run, tmp_path):  # noqa: F811
    [pair] = read_jsonl(prefs_run / "prefs" / "pairs.jsonl")[:1]
    pair = copy.deepcopy(pair)
    for side in ("prompt", "chosen", "rejected"):
        pair[side][-1]["content"] = f"{pair[side][-1].get('content') or ''} {side}: {MARKUP}"
    pair["meta"]["checks"]["markup"] = MARKUP
    if pair.get("tools"):
        pair["tools"][0]["function"]["description"] += f" {MARKUP}"
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [pair])
    name = prefix()
    settings = recipe(tmp_path, mode="server", dataset_prefix=name)
    assert push.main(argparse.Namespace(recipe=settings, overrides=[], input=None, pairs=[str(path)])) == 0
    dataset = sdk.datasets(pairs.dataset_name(name, pair["pipeline"]), workspace="posttrain")
    reviewer.open(dataset, f"chosen: {MARKUP}"[:30])
    page = words(reviewer.text())
    for side in ("prompt", "chosen", "rejected"):
        assert f"{side}: {words(MARKUP)}" in page, side
    assert words(json.dumps(MARKUP))[1:-1] in page  # in checks (and tools), inside their JSON
    reviewer.screenshot("review-pair-markup.png")


# ----------------------------------------------------------- several reviewers
def fleiss(table: list[list[int]]) -> float:
    """Fleiss' kappa written out (Fleiss 1971), to check the library's number."""
    n, k = len(table), sum(table[0])
    p = [sum(row[j] for row in table) / (n * k) for j in range(len(table[0]))]
    agree = sum((sum(c * c for c in row) - k) / (k * (k - 1)) for row in table) / n
    chance = sum(x * x for x in p)
    return (agree - chance) / (1 - chance)


def test_two_reviewers_per_record_agreement_disputes_and_the_summary(argilla, sdk, real_records, tmp_path, capsys):  # noqa: F811
    import argilla as rg

    from posttrain.summary import summary

    records = real_records["needle"] + real_records["table_qa"][:2]  # 6 + 2 records in two datasets
    name = push_one(tmp_path, records, min_submitted=2, unreviewed="pending")
    needle = sdk.datasets(f"{name}-needle", workspace="posttrain")
    assert needle.settings.distribution.min_submitted == 2
    users = [rg.User(username=f"rev{uuid.uuid4().hex[:6]}", password=uuid.uuid4().hex, role="annotator",
                     client=sdk).create() for _ in range(2)]
    for user in users:
        user.add_to_workspace(sdk.workspaces("posttrain"))
    a, b = (u.id for u in users)
    n = real_records["needle"]
    # (reviewer a, reviewer b) per needle record: agree x3, disagree, one reviewer only, nobody.
    plan = [("accept", "accept"), ("accept", "accept"), ("reject", "reject"), ("accept", "reject"),
            ("accept", None), (None, None)]
    for record, verdicts in zip(n, plan):
        for user, verdict in zip((a, b), verdicts):
            if verdict:
                submit(needle, record["id"], user, verdict=verdict, quality=4 if verdict == "accept" else 2)
    # Both accept the table QA records but write different corrections of the first.
    table = sdk.datasets(f"{name}-table_qa", workspace="posttrain")
    first, second = real_records["table_qa"][:2]
    submit(table, first["id"], a, verdict="accept", corrected_answer="The answer is 1.82.")
    submit(table, first["id"], b, verdict="accept", corrected_answer="It is 1.82.")
    for user in (a, b):
        submit(table, second["id"], user, verdict="accept")

    root = tmp_path / "run"
    out = root / "data" / "review"
    path = recipe(tmp_path, mode="server", dataset_prefix=name, min_submitted=2, unreviewed="pending")
    assert pull.main(args(path, write_inputs(tmp_path / "in", records), out)) == 0
    printed = capsys.readouterr().out
    stats = read_json(out / "review_stats.json")
    assert {b: stats[b] for b in pull.BUCKETS} == {"accepted": 3, "rejected": 1, "corrected": 0, "disputed": 2,
                                                    "pending": 2}
    assert stats["total"] == len(records) == sum(stats[b] for b in pull.BUCKETS)
    disputed = {r["id"]: r["meta"]["review"] for r in read_jsonl(out / "disputed.jsonl")}
    assert disputed[n[3]["id"]]["disputed_on"] == ["verdict"]
    assert disputed[first["id"]]["disputed_on"] == ["corrected_answer"]
    assert disputed[first["id"]]["verdicts"] == {"accept": 2}
    waiting = {r["id"]: r["meta"]["review"] for r in read_jsonl(out / "pending.jsonl")}
    assert waiting[n[4]["id"]] == {"decision": "pending", "by": "nobody", "reason": "awaiting_reviewers",
                                   "reviewers": 1, "required": 2}
    assert waiting[n[5]["id"]]["reason"] == "not_reviewed"
    assert stats["per_pipeline"]["needle"]["how"]["pending:nobody:awaiting_reviewers"] == 1

    # Fleiss' kappa per pipeline and question, over the records both reviewers answered.
    kappa = stats["kappa"]["needle"]
    expected = fleiss([[2, 0], [2, 0], [0, 2], [1, 1]])  # accept, reject counts per record
    assert kappa["verdict"]["records"] == 4 and kappa["verdict"]["raters"] == 2
    assert kappa["verdict"]["kappa"] == pytest.approx(expected, abs=1e-4) and expected == pytest.approx(0.4667, abs=1e-4)
    assert kappa["quality"]["kappa"] == pytest.approx(expected, abs=1e-4)  # quality followed the verdict
    assert stats["kappa"]["table_qa"]["verdict"] == {
        "kappa": None, "records": 2, "raters": 2, "categories": ["accept"], "observed": 1.0,
        "method": "fleiss (statsmodels)", "note": "every answer the same: kappa undefined"}
    assert "needle agreement: verdict kappa 0.467 (4 records x 2 reviewers)" in printed

    lines = "\n".join(summary(root))
    assert "disputed 2" in lines and "needle verdict 0.47 (n=4)" in lines, lines


# ------------------------------------------------------------------ bad input
def test_a_256k_token_document_is_pushed_shortened_and_comes_back_whole(argilla, sdk, reviewer, real_records,  # noqa: F811
                                                                         tmp_path, capsys):
    from pipeline import sources

    base = real_records["doc_qa"][0]
    gold = base["meta"]["source"]
    others = [d["text"] for d in sources.documents(["lee", "pydoc"])]
    parts, size = [], 0
    while size < 1_200_000:  # characters; counted in tokens below
        text = others[len(parts) % len(others)]
        parts.append(text)
        size += len(text)
    parts.insert(len(parts) // 2, gold)  # the gold document in the middle, as long doc QA embeds it
    document = "\n\n".join(parts)
    tokens = sources.count_tokens(document)
    assert tokens >= 256 * 1024, tokens
    messages = copy.deepcopy(base["messages"])
    messages[0]["content"] = document + "\n\n" + messages[0]["content"].rsplit("\n\n", 1)[-1]
    meta = {**copy.deepcopy(base["meta"]), "source": document}
    record = make_record("doc_qa", messages, meta).dump()

    # Past the server's limit (a display_chars above 20,000): one error naming the record.
    from review import cli

    refused = recipe(tmp_path, mode="server", dataset_prefix=prefix(), display_chars=40_000)
    ns = args(refused, write_inputs(tmp_path / "refused", [record]))
    ns.review_command = "push"
    assert cli.main(ns) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain review push: error: the server at") and len(err.splitlines()) == 1, err
    assert f"record {record['id']!r}: fields" in err and "20000 characters" in err, err

    name = push_one(tmp_path, [record], unreviewed="pending")  # review.display_chars: 20,000
    dataset = sdk.datasets(f"{name}-doc_qa", workspace="posttrain")
    [held] = list(dataset.records())
    assert len(held.fields["conversation"][0].content) <= 20_000 and len(held.fields["source"]) <= 20_000
    shown = held.fields["shown"]
    on_page = {"the user turn 1": held.fields["conversation"][0].content, "the source": held.fields["source"]}
    for what, full in (("the user turn 1", messages[0]["content"]), ("the source", document)):
        kept = int(re.search(rf"{what}: the first ([\d,]+) of {len(full):,} characters", shown)[1].replace(",", ""))
        assert 19_000 < kept <= 20_000
        assert html.unescape(on_page[what]) == full[:kept] + f"\n[... {len(full) - kept:,} more characters not shown ...]"
    assert f"The record ({record['id']}) keeps its full text" in shown
    assert words(base["meta"]["span_sentence"]) in words(held.fields["passage"])  # the passage is never cut
    reviewer.open(dataset, "Too long to show in full")
    reviewer.screenshot("review-long-document.png")

    out = tmp_path / "review"
    path = recipe(tmp_path, mode="server", dataset_prefix=name, unreviewed="keep")
    assert pull.main(args(path, write_inputs(tmp_path / "again", [record]), out)) == 0
    [back] = read_jsonl(out / "reviewed.jsonl")
    assert back["messages"] == record["messages"] and back["meta"]["source"] == document


# ----------------------------------------------------------------- mid-push kill
def test_a_server_killed_mid_push_loses_nothing_and_a_rerun_adds_only_what_is_missing(
    argilla, sdk, real_records, tmp_path, capsys,  # noqa: F811
):
    # Runs last: it kills the module's server and starts it again on the same state.
    conn, state = argilla
    records = []
    for i in range(200):  # the session's records, each asked again with its own number
        record = copy.deepcopy(real_records["table_qa"][i % len(real_records["table_qa"])])
        record["messages"][0]["content"] += f" (review copy {i})"
        records.append(make_record("table_qa", record["messages"], record["meta"]).dump())
    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name, batch_size=4)
    inputs = write_inputs(tmp_path, records)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "posttrain.cli", "review", "push", path, "--input", *inputs]
    pushing = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def held() -> list[str]:  # what the dataset holds (nothing while push has not made it yet)
        workspace = sdk.workspaces("posttrain")
        dataset = workspace and sdk.datasets(f"{name}-table_qa", workspace=workspace)
        return sorted(push.existing_ids(sdk, dataset.id)) if dataset else []

    deadline = time.monotonic() + 120
    while len(held()) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    server_pid = json.loads((state / "pids.json").read_text())["server"]["pid"]
    os.killpg(server_pid, signal.SIGKILL)  # the API process and anything it started: no clean shutdown
    out, err = pushing.communicate(timeout=120)
    assert pushing.returncode == 2, (out, err)
    assert f"pushing {name}-table_qa to {conn.api_url} failed after" in err

    # Start it again on the same state folder and port: `serve` clears what is left of
    # the old one (worker, Redis) and starts afresh on the same database.
    again = server.serve(state, port=int(conn.api_url.rsplit(":", 1)[1]), redis_port=free_port())
    assert again.api_url == conn.api_url
    before = held()
    assert 20 <= len(before) < len(records), len(before)  # killed mid-push, with records stored
    assert len(before) == len(set(before))
    capsys.readouterr()
    assert push.main(args(path, inputs)) == 0
    assert f"table_qa: {len(records) - len(before)} added, {len(before)} already there" in capsys.readouterr().out
    after = held()
    assert after == sorted(r["id"] for r in records)  # each record once, none lost
    assert push.main(args(path, inputs)) == 0  # and again: nothing to add
    assert f"table_qa: 0 added, {len(records)} already there" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nserver killed mid-push with {len(before)} of {len(records)} records stored; the rerun added"
              f" {len(records) - len(before)}; the dataset holds each of the {len(after)} once")
