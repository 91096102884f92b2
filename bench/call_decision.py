"""Does a model know when to call? Its chance of starting a call, on call items and on
items no offered function serves, before it writes a word.

    python bench/call_decision.py RECIPE --model MODEL [--split dev] [--count 50]

For each BFCL item of the eval's tool-use suite: the probability, teacher-forced in the
student's chat format, that the answer starts with `<tool_call>`, and whether greedy
decoding's first token starts it. Greedy decoding calls where that start beats every
other first token, so a mix or a step count can move where a model sits on the trade
between calling and abstaining, but only as far as the model ranks call items above
irrelevance items. The rank is the AUC (scipy's Mann-Whitney U, call items over
irrelevance items); `calls_kept_at_80` is the share of call items that still rank above
the 80th percentile of irrelevance items, the best a shift of the call prior alone
could keep at 80 % abstention.

Splits: `dev` (default; the dev slice, never gated), `test` (the gated items: report
only, never choose on it) and `live` (BFCL's live categories from the held-out slice,
the dev split before the dev slice). MODEL as for `posttrain eval`: base, a model folder
or an adapter folder.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

from evals import tool_calls  # noqa: E402
from evals.evaluate import load_model  # noqa: E402
from pipeline.bfcl import (  # noqa: E402
    bfcl_items,
    heldout_fraction,
    is_heldout,
    language_function_doc,
    openai_tool,
)
from pipeline.chat_template import prompt_text  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402

LIVE = {"simple": "live_simple", "multiple": "live_multiple", "irrelevance": "live_irrelevance"}


def items(recipe, split: str, count: int) -> list[tuple[str, list, list]]:
    """(category, messages, tools) for simple, multiple and irrelevance items."""
    if split == "live":
        # Drawn and shown as the eval did when they were its dev split (seed 0).
        fraction, out = heldout_fraction(recipe), []
        for name, category in LIVE.items():
            pool = [it for it in bfcl_items(category) if is_heldout(it["id"], fraction)]
            for i in sorted(random.Random(f"0-{category}").sample(range(len(pool)), min(count, len(pool)))):
                out.append((name, [dict(t) for t in pool[i]["question"][0]],
                            [openai_tool(language_function_doc(fn, category)) for fn in pool[i]["function"]]))
        return out
    cfg = tool_calls.Config(count=count, categories=["simple", "multiple", "irrelevance"])
    return [(it["category"], it["messages"], it["tools"])
            for it in tool_calls.build_items(cfg, None, {"recipe": recipe, "split": split})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--model", default="base")
    parser.add_argument("--split", choices=("dev", "test", "live"), default="dev")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--out", help="JSON file for the per-item rows and the summary")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    model, tokenizer, source = load_model(recipe, args.model)
    model.eval()
    start = tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]
    rows = []
    with torch.no_grad():
        for category, messages, tools in items(recipe, args.split, args.count):
            prompt = tokenizer(prompt_text(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([prompt + start])).logits[0].float(), -1)
            p_call = math.exp(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(start)))
            greedy = int(logp[len(prompt) - 1].argmax().item() == start[0])
            rows.append({"category": category, "p_call": p_call, "greedy_call": greedy})
    summary = {"model": source, "split": args.split}
    for category in ("simple", "multiple", "irrelevance"):
        mine = [r for r in rows if r["category"] == category]
        summary[category] = {"items": len(mine),
                             "mean_p_call": round(sum(r["p_call"] for r in mine) / len(mine), 4),
                             "greedy_call_share": round(sum(r["greedy_call"] for r in mine) / len(mine), 3)}
    calls = [r["p_call"] for r in rows if r["category"] != "irrelevance"]
    none = [r["p_call"] for r in rows if r["category"] == "irrelevance"]
    summary["auc"] = round(mannwhitneyu(calls, none).statistic / (len(calls) * len(none)), 3)
    cut = sorted(none)[int(0.8 * len(none))]
    summary["calls_kept_at_80"] = round(sum(p > cut for p in calls) / len(calls), 3)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
