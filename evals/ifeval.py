"""Instruction following: IFEval's prompts (541, Google's data), each carrying one or
more instructions a program can verify ("answer in at least 300 words", "no commas",
"wrap the answer in JSON" ...), scored with lm-evaluation-harness's IFEval checkers.

Scores (percent), as defined by IFEval and reported by lm-eval:
- prompt_strict: prompts whose every instruction is followed by the answer as is
- instruction_strict: instructions followed, over all instructions of all prompts
- prompt_loose / instruction_loose: the same, where an instruction also counts as
  followed when it holds after removing markdown asterisks and/or the answer's first
  or last line (IFEval's "loose" variants)

Answers get lm-eval's budget, 1280 tokens: "at least 300 words" and the like must be
reachable, or a before/after difference could come from answer length. A recipe may
lower it (`eval.ifeval.max_tokens`); the metrics then carry a `notes` line saying so.
Each metric has its standard error in `stderr` (evals/standard_error.py).

The prompts come from pipeline.ifeval_data (the file dedup also decontaminates
against). lm-eval's checkers count sentences with NLTK's punkt_tab tokenizer, which
`make setup` puts in the environment's own nltk_data folder; without it their import
would try a download, so we check for it first and say how to get it.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from pydantic import Field

from evals import standard_error
from pipeline.ifeval_data import ifeval_items
from pipeline.recipe import Section

NAME = "ifeval"
# lm-eval's generation budget for IFEval (ifeval.yaml max_gen_toks). Several prompts ask
# for 300+ words or several paragraphs; a smaller budget makes them unreachable.
LM_EVAL_MAX_TOKENS = 1280


class Config(Section):
    enabled: bool = True
    # Prompts, a seeded sample of the 541 (541 or more = all, lm-eval's full task).
    count: int = Field(16, ge=0)
    # lm-eval's budget. A recipe may lower it (a random student never stops early);
    # the scores then say so in `notes`.
    max_tokens: int = Field(LM_EVAL_MAX_TOKENS, gt=0)
    seed: int = 0


# ---------------------------------------------------------------------------- items
def build_items(cfg: Config, tokenizer, context: dict) -> list[dict[str, Any]]:
    """`count` prompts, a seeded sample; the dev split (`context["split"]`) samples the
    prompts the test sample left out, so choices made on it never see a gated prompt."""
    pool = ifeval_items()
    test = random.Random(cfg.seed).sample(range(len(pool)), min(cfg.count, len(pool)))
    if context.get("split", "test") == "dev":
        rest = sorted(set(range(len(pool))) - set(test))
        if not rest:
            raise ValueError(f"ifeval: count {cfg.count} takes all {len(pool)} prompts; no dev split is left")
        test = random.Random(f"{cfg.seed}-dev").sample(rest, min(cfg.count, len(rest)))
    picks = sorted(test)
    return [{
        "id": f"ifeval/{pool[i]['key']}",
        "messages": [{"role": "user", "content": pool[i]["prompt"]}],
        "key": pool[i]["key"],
        "prompt": pool[i]["prompt"],
        "instruction_id_list": pool[i]["instruction_id_list"],
        "kwargs": pool[i]["kwargs"],
    } for i in picks]


# ---------------------------------------------------------------------------- score
@functools.cache
def _checkers():
    """lm-eval's strict and loose IFEval checks and its input type."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        raise RuntimeError(
            "IFEval's sentence counting needs NLTK's punkt_tab, which `make setup` copies "
            "from the llama-index-core 0.14.25 wheel into <venv>/nltk_data/tokenizers/"
        ) from None
    from langdetect import DetectorFactory
    from lm_eval.tasks.ifeval import utils

    # The case and language checks ask langdetect, which samples at random unless
    # seeded: on short answers the same text could pass one run and fail the next.
    # A fixed seed is langdetect's documented way to make detection deterministic.
    DetectorFactory.seed = 0
    return utils.test_instruction_following_strict, utils.test_instruction_following_loose, utils.InputExample


def check(item: dict[str, Any], response: str) -> tuple[list[bool], list[bool]]:
    """Per-instruction results (strict, loose) for one answer."""
    strict, loose, example = _checkers()
    inp = example(key=item["key"], instruction_id_list=item["instruction_id_list"],
                  prompt=item["prompt"], kwargs=item["kwargs"])
    # IFEval's checkers draw from `random` where an argument is unusable (two prompts
    # ask to count "#" or "!", and the letter-count check then picks a random letter).
    # Seeding the draw per prompt keeps a score reproducible and strict and loose on
    # the same letter; the process's random state is left as it was.
    state = random.getstate()
    try:
        random.seed(item["key"])
        strict_results = strict(inp, response).follow_instruction_list
        random.seed(item["key"])
        loose_results = loose(inp, response).follow_instruction_list
    finally:
        random.setstate(state)
    return strict_results, loose_results


def _percent(hits: list[bool]) -> float:
    return round(100.0 * sum(hits) / len(hits), 2) if hits else 0.0


def notes(cfg: Config) -> list[str]:
    """What a reader must know before comparing these scores with IFEval's."""
    if cfg.max_tokens < LM_EVAL_MAX_TOKENS:
        return [f"max_tokens: {cfg.max_tokens} (IFEval uses {LM_EVAL_MAX_TOKENS}): "
                "length instructions may be unreachable"]
    return []


def score(items: list[dict[str, Any]], answers: list[str], cfg: Config) -> dict[str, Any]:
    if len(items) != len(answers):
        raise ValueError(f"ifeval: {len(items)} items but {len(answers)} answers")
    rows = []
    prompt_strict, prompt_loose, inst_strict, inst_loose = [], [], [], []
    per_prompt = {"strict": [], "loose": []}  # (followed, instructions) of each prompt
    for item, response in zip(items, answers):
        strict, loose = check(item, response)
        prompt_strict.append(all(strict))
        prompt_loose.append(all(loose))
        inst_strict += strict
        inst_loose += loose
        per_prompt["strict"].append((sum(strict), len(strict)))
        per_prompt["loose"].append((sum(loose), len(loose)))
        failed = [i for i, ok in zip(item["instruction_id_list"], strict) if not ok]
        rows.append({"id": item["id"], "passed": all(strict), "score": _percent(strict),
                     "loose_passed": all(loose), "loose_score": _percent(loose), "instructions": len(strict),
                     "reason": "all followed" if not failed else "not followed: " + ", ".join(failed)})
    metrics = {
        "prompt_strict": _percent(prompt_strict),
        "prompt_loose": _percent(prompt_loose),
        "instruction_strict": _percent(inst_strict),
        "instruction_loose": _percent(inst_loose),
        "counts": {"prompts": len(items), "instructions": len(inst_strict)},
        # Prompt level: a mean over prompts. Instruction level: instructions followed
        # over instructions given, with the prompt as the unit (its instructions share
        # one answer).
        "stderr": {
            "prompt_strict": standard_error.of_mean([100.0 * ok for ok in prompt_strict]),
            "prompt_loose": standard_error.of_mean([100.0 * ok for ok in prompt_loose]),
            **{f"instruction_{kind}": standard_error.of_ratio([100.0 * f for f, _ in pairs], [n for _, n in pairs])
               for kind, pairs in per_prompt.items()},
        },
    }
    if notes(cfg):
        metrics["notes"] = notes(cfg)
    return {"metrics": metrics, "items": rows}
