"""`posttrain grpo-prompts RECIPE`: the prompts GRPO trains on, from each pipeline's own
prompt step (step (i) of synth_data/four_steps.py), so RL needs no teacher answers.

Per pipeline in `grpo.prompts` (a count each), the pipeline's `sample_prompts` runs
with its `generate.<name>` settings, that count and `grpo.seed` (seeded apart from
generation, so RL prompts are new ones), and code turns each into chat turns plus
what its validator needs (synth_data/rewards.py):

  tool_use      the request stated by code from the sampled calls (tool_use.stated_request),
                the tools in context; verifier: the expected calls.
                Irrelevance prompts keep their BFCL request and expect no call.
  steerability  the drafting request with its instructions (the system variant: the
                shared instruction as the system turn and the first request); verifier:
                the constraints
  table_qa      the table's facts stated by code and the question; verifier: the values
                the computed answer states (table_qa.check_answer)

Prompts that share a word n-gram with a held-out eval item are dropped, with the same
decontamination as the SFT data (dedup's Decontaminator over the same items).

`grpo.heldout` asks for held-out prompts per pipeline: sampled the same way with seed
`grpo.seed + 1`, decontaminated alike, and dropped when a training prompt has the same
text; the grpo stage scores them before and after training (its paired effect).

Writes OUT/prompts.jsonl and OUT/heldout.jsonl (pipeline.contract.GrpoPrompt) and
OUT/prompt_stats.json: per pipeline sampled, contaminated, kept (and for the held-out
prompts, how many repeated a training prompt).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pipeline.contract import GrpoPrompt, GrpoPromptStats, record_id, write_grpo_prompts, write_report
from pipeline.recipe import RecipeError, add_recipe_arguments, load_recipe
from synth_data import four_steps
from synth_data.dedup import Decontaminator, heldout_reference


def add_arguments(parser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--out", default="data/grpo", help="folder for prompts.jsonl and prompt_stats.json")


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    own = recipe.grpo_own
    items = heldout_reference(recipe)  # the held-out eval items dedup checks the SFT data against
    decontaminator = Decontaminator(items, recipe.dedup.ngram) if items else None
    prompts, stats = [], {"pipelines": {}}
    for name, count in own.prompts.items():
        sampled = sample(recipe, name, count, own.seed, "grpo.prompts")
        kept = [p for p in sampled if decontaminator is None or not decontaminator.match(prompt_text(p))]
        stats["pipelines"][name] = {"sampled": len(sampled), "contaminated": len(sampled) - len(kept),
                                    "kept": len(kept)}
        prompts += kept
    heldout, stats["heldout"] = [], {}
    trained = {prompt_text(p) for p in prompts}
    for name, count in own.heldout.items():
        # Three times the count sampled: some repeat a training prompt (a finite pool
        # such as BFCL's call sets is drawn by both seeds).
        sampled = sample(recipe, name, 3 * count, own.seed + 1, "grpo.heldout")
        clean = [p for p in sampled if decontaminator is None or not decontaminator.match(prompt_text(p))]
        untrained = [p for p in clean if prompt_text(p) not in trained]
        new = list({p.id: p for p in untrained}.values())  # each once
        for p in new[:count]:
            p.id = f"heldout-{p.id}"
        heldout += new[:count]
        stats["heldout"][name] = {"sampled": len(sampled), "contaminated": len(sampled) - len(clean),
                                  "trained": len(clean) - len(untrained), "kept": len(new[:count])}
    stats["prompts"] = len(prompts)
    stats["heldout_items"] = len(items)
    if not prompts and any(own.prompts.values()):
        raise RecipeError(f"recipe {recipe.path}: grpo.prompts: every sampled prompt was contaminated")
    out = Path(args.out)
    write_grpo_prompts(out / "prompts.jsonl", prompts)
    write_grpo_prompts(out / "heldout.jsonl", heldout)
    write_report(out / "prompt_stats.json", GrpoPromptStats, stats)
    print(json.dumps(stats["pipelines"]))
    return 0


def sample(recipe, name: str, count: int, seed: int, key: str) -> list[GrpoPrompt]:
    """`count` of the pipeline's step-1 prompts with its `generate.<name>` settings and
    `seed`, as GRPO prompts (what `posttrain plan` sizes, too)."""
    raw = {**((recipe.raw.get("generate") or {}).get(name) or {}), "count": count, "seed": seed}
    cfg = four_steps.validate_config(name, raw, f"recipe {recipe.path} ({key}.{name})")
    return [as_grpo_prompt(name, p) for p in four_steps.load_pipeline(name).sample_prompts(cfg, random.Random(seed))]


def prompt_text(prompt: GrpoPrompt) -> str:
    return "\n".join(turn.content for turn in prompt.prompt)


def as_grpo_prompt(pipeline: str, p: dict[str, Any]) -> GrpoPrompt:
    """One pipeline's step-1 prompt as chat turns + its verifier's needs."""
    tools = None
    if pipeline == "tool_use":
        from synth_data.tool_use import stated_request

        request = p["request"] if not p["calls"] else stated_request(p["calls"], p["tools"])
        turns = [{"role": "user", "content": request}]
        tools = p["tools"]
        verifier = {"calls": p["calls"]}  # the tools ride in the prompt's own `tools`
        meta = {"seed_id": p["id"], "kind": p["kind"], "source": p["source"]}
    elif pipeline == "steerability":
        from synth_data.steerability import _system_turn, _user_turn

        if p["variant"] == "system":
            turns = [{"role": "system", "content": _system_turn(p["constraints"][0])},
                     {"role": "user", "content": p["requests"][0]}]
        else:
            turns = [{"role": "user", "content": _user_turn(p["requests"][0], p["constraints"])}]
        verifier = {"constraints": p["constraints"]}
        meta = {"seed_id": p["id"], "variant": p["variant"]}
    elif pipeline == "table_qa":
        turns = [{"role": "user", "content": f"{p['facts']}\n\nQuestion: {p['question']}"}]
        verifier = {"stated": p["stated"], "not_stated": p.get("not_stated", [])}
        meta = {"seed_ids": p["seed_ids"], "question_type": p["question_type"], "answer": p["answer"],
                "source": p["table_markdown"]}
    else:
        raise RecipeError(f"grpo.prompts: no GRPO prompts for pipeline {pipeline!r}")
    return GrpoPrompt.model_validate({"id": record_id(pipeline, turns, tools), "pipeline": pipeline,
                                      "prompt": turns, "tools": tools, "verifier": verifier, "meta": meta})
