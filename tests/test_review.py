"""Human review against a real local Argilla server (argilla-server + SQL search engine,
real Redis, real SDK, real headless Chromium). No mocks.

One server for the module (start-up is the expensive part); each test uses its own
dataset prefix so tests do not see each other's records. The records are real stage
output: the needle pipeline's, made once for the module (it needs no teacher).
"""

import argparse
import copy
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from stage_outputs import needle_records

from pipeline.contract import read_records
from pipeline.ports import free_port
from pipeline.records import read_json, read_jsonl, write_jsonl
from review import pull, push, server

pytestmark = pytest.mark.skipif(
    not (server.SERVER_VENV / "bin" / "python").exists(), reason=".venv-argilla missing: run `make setup`"
)
ARTIFACTS = Path(os.environ.get("POSTTRAIN_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts"))


@pytest.fixture(scope="module")
def argilla(tmp_path_factory):
    state = tmp_path_factory.mktemp("argilla-state")
    conn = server.serve(state, port=free_port(), redis_port=free_port())
    saved = {k: os.environ.get(k) for k in ("ARGILLA_API_URL", "ARGILLA_API_KEY")}
    os.environ.update(ARGILLA_API_URL=conn.api_url, ARGILLA_API_KEY=conn.api_key)
    try:
        yield conn, state
    finally:
        server.stop(state)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def sdk(argilla):
    conn, _ = argilla
    return server.argilla_client(conn)


@pytest.fixture(scope="module")
def needles(tmp_path_factory):
    """Eight real needle records: 1,024-token ones, then 2,048-token ones."""
    folder = tmp_path_factory.mktemp("needle")
    return needle_records(folder / "short", 4) + needle_records(folder / "long", 4, length_buckets=(2048,), seed=1)


@pytest.fixture
def candidates(needles):
    """The first n real records (copies: a test may change its own)."""
    return lambda n: copy.deepcopy(needles[:n])


def write_inputs(root: Path, records: list[dict]) -> list[str]:
    paths = []
    for pipeline in sorted({r["pipeline"] for r in records}):
        path = root / "synth" / pipeline / "accepted.jsonl"
        write_jsonl(path, [r for r in records if r["pipeline"] == pipeline])
        paths.append(str(path))
    return paths


def recipe(root: Path, **review) -> str:
    path = root / "recipe.yaml"
    path.write_text("review:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in review.items()))
    return str(path)


def args(recipe_path: str, inputs: list[str], out: Path | None = None, overrides=()) -> argparse.Namespace:
    return argparse.Namespace(recipe=recipe_path, overrides=list(overrides), input=inputs,
                              out=str(out) if out else None)


def prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]


def submit(dataset, record_id: str, user_id, **answers) -> None:
    """Answer one record as a reviewer does: every answer submitted."""
    import argilla as rg

    record = next(r for r in dataset.records(with_responses=True) if r.id == record_id)
    for question, value in answers.items():
        record.responses.add(rg.Response(question, value, user_id=user_id, status="submitted"))
    dataset.records.log([record])


# ------------------------------------------------------------------------ tests
def test_round_trip_accept_reject_correct_and_pending(argilla, sdk, candidates, tmp_path):
    records = candidates(6)
    inputs = write_inputs(tmp_path, records)
    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name, unreviewed="pending")
    assert push.main(args(path, inputs)) == 0

    dataset = sdk.datasets(f"{name}-needle", workspace="posttrain")
    me = sdk.me.id
    accepted, rejected, corrected = [r["id"] for r in records[:3]]
    original = records[2]["messages"][-1]
    fixed = original["content"].rstrip(".") + ", as the text says."
    submit(dataset, accepted, me, verdict="accept", quality=5)
    submit(dataset, rejected, me, verdict="reject", quality=1)
    submit(dataset, corrected, me, verdict="accept", corrected_answer=fixed)

    # A second reviewer agrees on two records (logged by the owner on their behalf,
    # as the SDK allows an owner to).
    import argilla as rg

    second = rg.User(username=f"rev{uuid.uuid4().hex[:6]}", password=uuid.uuid4().hex, role="annotator",
                     client=sdk).create()
    second.add_to_workspace(sdk.workspaces("posttrain"))
    submit(dataset, rejected, second.id, verdict="reject")
    submit(dataset, accepted, second.id, verdict="accept", quality=4)

    out = tmp_path / "review"
    assert pull.main(args(path, inputs, out)) == 0
    stats = read_json(out / "review_stats.json")
    assert (stats["accepted"], stats["rejected"], stats["corrected"], stats["pending"]) == (1, 1, 1, 3)
    assert stats["total"] == 6 == sum(stats[b] for b in pull.BUCKETS)
    assert stats["per_pipeline"]["needle"]["pending"] == 3
    assert stats["agreement"] == {"records_with_several_reviewers": 2, "unanimous_verdict": 2, "rate": 1.0}

    # Pull's outputs keep the record contract, with review's decision typed in meta.review.
    reviewed = {r.id: r for r in read_records(out / "reviewed.jsonl", trainable=True)}
    assert set(reviewed) == {accepted, corrected}
    assert reviewed[corrected].messages[-1].dump() == {"role": "assistant", "content": fixed}
    assert reviewed[corrected].meta.review.original_final_turn.dump() == original
    assert reviewed[corrected].meta.review.decision == "corrected"
    assert reviewed[accepted].meta.review.quality == 4.5
    [rej] = read_records(out / "rejected.jsonl")
    assert rej.id == rejected and rej.reject_reason == "human_reject"
    assert rej.meta.review.decision == "rejected"
    pending = read_records(out / "pending.jsonl")
    assert len(pending) == 3 and {r.meta.review.decision for r in pending} == {"pending"}

    # The recipe decides about unreviewed records: keep the automatic verdict.
    assert pull.main(args(path, inputs, out, ["review.unreviewed=keep"])) == 0
    stats = read_json(out / "review_stats.json")
    assert (stats["accepted"], stats["rejected"], stats["corrected"], stats["pending"]) == (4, 1, 1, 0)


def test_push_twice_holds_each_record_once_and_adds_only_new(argilla, sdk, candidates, tmp_path):
    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name, batch_size=3)
    first = candidates(5)
    inputs = write_inputs(tmp_path, first)
    assert push.main(args(path, inputs)) == 0
    assert push.main(args(path, inputs)) == 0
    dataset = sdk.datasets(f"{name}-needle", workspace="posttrain")
    ids = [r.id for r in dataset.records()]
    assert sorted(ids) == sorted(r["id"] for r in first)

    inputs = write_inputs(tmp_path, candidates(7))
    assert push.main(args(path, inputs)) == 0
    assert len([r.id for r in dataset.records()]) == 7


def test_seeded_sample_is_pushed_and_the_rest_keeps_its_automatic_verdict(argilla, sdk, candidates, tmp_path):
    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name, sample_per_pipeline=3, seed=7, unreviewed="pending")
    records = candidates(8)
    inputs = write_inputs(tmp_path, records)
    assert push.main(args(path, inputs)) == 0
    dataset = sdk.datasets(f"{name}-needle", workspace="posttrain")
    assert len(list(dataset.records())) == 3
    out = tmp_path / "review"
    assert pull.main(args(path, inputs, out)) == 0
    stats = read_json(out / "review_stats.json")
    assert (stats["accepted"], stats["pending"]) == (5, 3)
    assert stats["per_pipeline"]["needle"]["how"]["accepted:automatic:not_sampled"] == 5


def test_sql_search_engine_answers_filters_text_and_progress(argilla, sdk, candidates, tmp_path):
    import argilla as rg

    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name)
    records = candidates(6)  # four in the 1,024-token bucket, two in the 2,048 one
    assert push.main(args(path, write_inputs(tmp_path, records))) == 0
    dataset = sdk.datasets(f"{name}-needle", workspace="posttrain")
    submit(dataset, records[1]["id"], sdk.me.id, verdict="reject")

    def found(query):
        return sorted(r.id for r in dataset.records(query=query))

    longer = sorted(r["id"] for r in records if r["meta"]["length_bucket"] == 2048)
    assert len(longer) == 2
    assert found(rg.Query(filter=rg.Filter(("metadata.length_bucket", "==", "2048")))) == longer
    value = records[3]["meta"]["needles"][0]["value"]
    assert found(rg.Query(query=f"MAGIC {value} zebra")) == []
    assert found(rg.Query(query=f"MAGIC {value}")) == [records[3]["id"]]
    assert found(rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))) == [records[1]["id"]]
    assert len(found(rg.Query(filter=rg.Filter(("response.status", "==", "pending"))))) == 5
    assert len(found(rg.Query(filter=rg.Filter(("verdict.suggestion", "==", "accept"))))) == 6
    assert len(found(rg.Query(filter=rg.Filter(("metadata.validator_reasons", "==", "length_bucket:pass"))))) == 6
    progress = dataset.progress()
    assert progress["total"] == 6 and progress["completed"] == 1


def test_auto_mode_without_a_server_passes_automatic_verdicts_through(candidates, tmp_path, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("ARGILLA_API_KEY", "unused")
    records = candidates(3)
    inputs = write_inputs(tmp_path, records)
    out = tmp_path / "review"
    assert pull.main(args(recipe(tmp_path, mode="auto"), inputs, out)) == 0
    stats = read_json(out / "review_stats.json")
    assert stats["accepted"] == 3 and stats["server"] is None and "unreachable" in stats["note"]
    assert [r["id"] for r in read_jsonl(out / "reviewed.jsonl")] == [r["id"] for r in records]


def test_bad_input_and_bad_recipe_keys_are_named(candidates, tmp_path, capsys):
    from pipeline.recipe import RecipeError, load_recipe
    from review.dataset import ReviewInputError, load_candidates

    records = candidates(3)
    records[1]["messages"] = records[1]["messages"][:-1]  # ends on the user's turn
    del records[2]["meta"]["validators"]
    [path] = write_inputs(tmp_path, records)
    with pytest.raises(ReviewInputError, match=rf"{path}:2: record '{records[1]['id']}': messages: the final turn"):
        load_candidates([path])
    write_inputs(tmp_path, [records[0], records[2]])
    with pytest.raises(ReviewInputError, match=rf"{path}:2: record '{records[2]['id']}': meta.validators: Field required"):
        load_candidates([path])
    with pytest.raises(ReviewInputError, match="matches no file"):
        load_candidates([str(tmp_path / "nothing" / "*.jsonl")])
    with pytest.raises(RecipeError, match="review.unreviewed"):
        load_recipe(recipe(tmp_path), ["review.unreviewed=maybe"])


def test_wrong_api_key_is_one_clear_error(argilla, candidates, tmp_path, monkeypatch, capsys):
    from review import cli

    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-key")
    inputs = write_inputs(tmp_path, candidates(2))
    out = tmp_path / "review"
    for command in ("push", "pull"):
        ns = args(recipe(tmp_path, mode="auto"), inputs, out)
        ns.review_command = command
        assert cli.main(ns) == 2
        err = capsys.readouterr().err
        assert "rejected the API key" in err and argilla[0].api_url in err
    assert not out.exists()


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium, driven by selenium through Debian's chromedriver."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("chromium + chromium-driver not installed (CI installs them with apt)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    # A driver path skips Selenium Manager, which would try to download a driver.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_browser_reviewer_rejects_a_record_and_pull_sees_it(argilla, sdk, candidates, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    conn, state = argilla
    creds = json.loads((state / "credentials.json").read_text())
    name = prefix()
    path = recipe(tmp_path, mode="server", dataset_prefix=name, unreviewed="pending")
    records = candidates(3)
    inputs = write_inputs(tmp_path, records)
    assert push.main(args(path, inputs)) == 0
    dataset = sdk.datasets(f"{name}-needle", workspace="posttrain")

    wait = WebDriverWait(browser, 30)

    def visible(css):  # the first displayed element matching css, once there is one
        return wait.until(EC.visibility_of_any_elements_located((By.CSS_SELECTOR, css)))[0]

    def page_says(text):
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), text))

    browser.get(f"{conn.api_url}/sign-in")
    visible("input[name=Username]").send_keys(creds["username"])
    visible("input[name=Password]").send_keys(creds["password"])
    visible("button[type=submit]").click()
    page_says("posttrain")  # the home page lists the workspace
    browser.get(f"{conn.api_url}/dataset/{dataset.id}/annotation-mode")
    visible("label[for=verdict_reject]").click()
    visible("label.label-active[for=verdict_reject]")  # the choice is shown
    page = browser.find_element(By.TAG_NAME, "body").text
    shown = next(r for r in records if r["messages"][-1]["content"] in page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "review-annotation-page.png"
    assert browser.save_screenshot(str(shot))
    visible("button.button--submit").click()
    page_says("Submitted\n1")  # the progress counter moved
    assert shot.stat().st_size > 10_000

    out = tmp_path / "review"
    assert pull.main(args(path, inputs, out)) == 0
    stats = read_json(out / "review_stats.json")
    assert (stats["rejected"], stats["pending"]) == (1, 2)
    [rej] = read_jsonl(out / "rejected.jsonl")
    assert rej["id"] == shown["id"] and rej["reject_reason"] == "human_reject"


def test_stopped_server_fails_fast_and_writes_nothing(candidates, tmp_path, capsys, monkeypatch):
    # A server of its own, stopped as a person running `review stop` would: the module's
    # server keeps serving the other tests, in whatever order they run.
    from review import cli

    state = tmp_path / "argilla-state"
    conn = server.serve(state, port=free_port(), redis_port=free_port())
    monkeypatch.setenv("ARGILLA_API_URL", conn.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", conn.api_key)
    assert server.stop(state) == ["worker", "server", "redis"]
    inputs = write_inputs(tmp_path, candidates(2))
    out = tmp_path / "review"
    for command in ("push", "pull"):
        ns = args(recipe(tmp_path, mode="server"), inputs, out)
        ns.review_command = command
        assert cli.main(ns) == 2
        err = capsys.readouterr().err
        assert f"no Argilla server answers at {conn.api_url}" in err
    assert not out.exists()
