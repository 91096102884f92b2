"""Forgetting probe: the model's token-level cross-entropy on general text the SFT
never saw, reported apart from the held-out loss (evals/heldout_loss.py), which is
in-distribution: the mix's own eval split measures fit to the mix, this measures what
fine-tuning cost the model on ordinary prose.

The text: the 50 news articles of Lee, Pincombe and Welsh's document-similarity study
(2005), which gensim, a project dependency, ships as `test/test_data/lee.cor`.
- General: short Australian news reports from 2001 (politics, business, courts, sport,
  bushfires, the Middle East ...), plain English prose of the kind language models
  pretrain on; no chat turns, no instructions, nothing the mix's pipelines produce.
- Unseen by the SFT: no pipeline reads this file. The pipelines draw their documents
  and filler from pipeline/sources.py: gensim's *other* Lee file,
  `lee_background.cor` (300 different articles), Python's pydoc topics and Debian
  fortunes; the tests check that no sentence of the probe occurs in any of them and that
  no module but this one names the file.

Each document is scored as lm-eval scores a rolling loglikelihood (wikitext's word
perplexity, `loglikelihood_rolling`): its tokens without special tokens, preceded by the
model's BOS token (EOS when it has none) as the only context, every document token
predicted; cut to `max_length` tokens. Rows: `id`, `tokens`, `loss` (mean nats/token).
Metrics: `overall` (token-weighted mean over documents, nats/token; lower is better),
`perplexity`, `tokens`, `documents`, `source`, and `stderr.overall` (the ratio
estimator with the document as the unit, evals/standard_error.py).

Recipe: `eval.forgetting: {enabled, count, max_length}`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from evals import standard_error
from pipeline.recipe import Section

NAME = "forgetting"
SOURCE = "gensim test/test_data/lee.cor: 50 news articles (Lee, Pincombe & Welsh 2005)"


class Config(Section):
    enabled: bool = True
    count: int = Field(50, ge=1)  # documents, in file order (the file holds 50)
    max_length: int = Field(1024, gt=0)  # tokens per document (the longest is ~170)


@functools.cache
def documents() -> tuple[dict[str, str], ...]:
    """The probe's documents: lee.cor, one article per line, ids `lee-test-00`..."""
    spec = importlib.util.find_spec("gensim")  # located without importing gensim (slow)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the forgetting probe's text ships with gensim: pip install gensim==4.4.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee.cor"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the forgetting probe's text is missing from the gensim package")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple({"id": f"lee-test-{i:02d}", "text": " ".join(line.split())}
                 for i, line in enumerate(lines) if line.strip())


def context_token(tokenizer) -> int:
    """lm-eval's prefix token for rolling loglikelihoods: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def document_loss(model, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """(sum of CE over the document's tokens, their count), the first predicted from
    the context token alone."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    device = next(model.parameters()).device
    input_ids = torch.tensor([[context_token(tokenizer), *ids]], device=device)
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum")
    return float(ce), len(ids)


def evaluate(model, tokenizer, cfg: Config) -> dict[str, Any]:
    """{"metrics": {overall, perplexity, tokens, documents, source, stderr}, "items": rows}"""
    model.eval()
    rows, sums, counts = [], [], []
    for doc in documents()[: cfg.count]:
        total, n = document_loss(model, tokenizer, doc["text"], cfg.max_length)
        rows.append({"id": doc["id"], "tokens": n, "loss": round(total / n, 4)})
        sums.append(total)
        counts.append(n)
    overall = round(sum(sums) / sum(counts), 4)
    metrics = {
        "overall": overall,
        "perplexity": round(math.exp(overall), 2),
        "tokens": sum(counts),
        "documents": len(rows),
        "source": SOURCE,
        "stderr": {"overall": standard_error.of_ratio(sums, counts)},
    }
    return {"metrics": metrics, "items": rows}
