"""The forgetting probe: loss on general text the SFT never saw. Its text is 50 real
news articles that no pipeline reads; each document's loss is lm-eval's rolling
loglikelihood on the real model; a damaged model scores worse; the recipe subsection
is validated like every suite's and the eval stage reports it apart from the held-out
loss."""

import re
from pathlib import Path

import pytest

from evals import forgetting, standard_error
from pipeline import sources
from pipeline.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def smollm2(teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(teacher_dir))


def shingles(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


# ------------------------------------------------------------------------- the text
def test_the_text_is_fifty_news_articles_no_pipeline_source_holds():
    docs = forgetting.documents()
    assert len(docs) == 50 and len({d["id"] for d in docs}) == 50
    assert all(300 <= len(d["text"]) <= 800 for d in docs)  # short news reports, one per line
    probe = set().union(*(shingles(d["text"]) for d in docs))
    # Every text the pipelines draw on (documents, haystack filler, derived chat seeds).
    used = [*sources.lee_documents(), *sources.pydoc_documents(), *sources.fortunes(),
            *sources.filler_passages("auto")]
    assert len(used) > 300
    shared = [d["id"] for d in used if shingles(d["text"]) & probe]
    assert not shared, shared[:5]


def test_no_module_but_the_probe_reads_its_file():
    readers = [p.relative_to(ROOT).as_posix() for package in ("pipeline", "synth_data", "review", "sft", "evals")
               for p in (ROOT / package).rglob("*.py") if "lee.cor" in p.read_text()]
    assert readers == ["evals/forgetting.py"]


# ------------------------------------------------------------------------- the loss
def test_document_loss_is_lm_evals_rolling_loglikelihood(smollm2):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smollm2
    result = forgetting.evaluate(model, tokenizer, forgetting.Config(count=4))
    rows = result["items"]
    assert [r["id"] for r in rows] == ["lee-test-00", "lee-test-01", "lee-test-02", "lee-test-03"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d["text"],), idx=i)
                for i, d in enumerate(forgetting.documents()[:4])]
    logliks = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    for row, loglik in zip(rows, logliks):
        assert row["loss"] == pytest.approx(-loglik / row["tokens"], abs=2e-4)

    metrics = result["metrics"]
    sums, counts = [r["loss"] * r["tokens"] for r in rows], [r["tokens"] for r in rows]
    assert metrics["overall"] == pytest.approx(sum(sums) / sum(counts), abs=1e-3)
    assert metrics["tokens"] == sum(counts) and metrics["documents"] == 4
    assert metrics["stderr"]["overall"] == pytest.approx(standard_error.of_ratio(sums, counts), abs=1e-3)
    assert 0 < metrics["stderr"]["overall"] < 1
    assert 1.5 < metrics["overall"] < 5  # a small real LM on news prose


def test_a_damaged_model_scores_worse(smollm2):
    import copy

    import torch

    model, tokenizer = smollm2
    cfg = forgetting.Config(count=5)
    healthy = forgetting.evaluate(model, tokenizer, cfg)["metrics"]
    damaged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in damaged.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                weight.add_(torch.randn(weight.shape, generator=generator) * weight.std())
    hurt = forgetting.evaluate(damaged, tokenizer, cfg)["metrics"]
    assert hurt["overall"] > healthy["overall"] + 5 * healthy["stderr"]["overall"]


def test_max_length_cuts_each_document(smollm2):
    model, tokenizer = smollm2
    rows = forgetting.evaluate(model, tokenizer, forgetting.Config(count=3, max_length=16))["items"]
    assert [r["tokens"] for r in rows] == [16, 16, 16]


# ----------------------------------------------------------------------- the recipe
def test_the_recipe_subsection_is_validated_and_can_be_switched_off():
    from evals.evaluate import suite_configs

    with pytest.raises(RecipeError) as err:
        suite_configs(load_recipe(TINY, ["eval.forgetting.cuont=3", "eval.forgetting.max_length=0"]))
    assert "eval.forgetting.cuont" in str(err.value) and "eval.forgetting.max_length" in str(err.value)
    module, cfg = suite_configs(load_recipe(TINY, ["eval.forgetting.count=7"]))["forgetting"]
    assert module is forgetting and cfg.count == 7 and cfg.enabled
    assert "forgetting" not in suite_configs(load_recipe(TINY, ["eval.forgetting.enabled=false"]))
