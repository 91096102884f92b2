"""Eval throughput: the vLLM engine against the transformers engine on the same
SmolLM2-135M-Instruct eval prompts at 1K and 2K tokens, interleaved (rounds alternate
engines so a busy machine slows both alike). Prints items/s and tokens/s (prompt +
generated) per engine and length, and the ratio.

    python bench/eval_speed.py [--items 8] [--max-tokens 32] [--rounds 2]

The prompts are needle-in-a-haystack items built the way the retention suite builds
them: real filler text (pipeline/sources.py) cut to the length in the student's
tokens, rendered with the training template.
"""

from __future__ import annotations

import argparse
import random
import time

from pipeline.chat_template import apply_training_template
from pipeline.engines import Sampling, TransformersEngine, VLLMEngine
from pipeline.model_paths import teacher_path


def n_tokens(tokenizer, conv: list[dict]) -> int:
    """Prompt length as the engines see it (apply_chat_template returns a dict of
    input_ids and attention_mask in transformers 5: count the ids)."""
    return len(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


def prompts(tokenizer, length: int, count: int) -> list[list[dict]]:
    from pipeline.sources import filler_passages

    paragraphs = [p["text"] for p in filler_passages()]
    rng = random.Random(length)
    out = []
    for i in range(count):
        key, value = f"item-{i}", rng.randint(1_000_000, 9_999_999)
        needle = f"The special magic number for {key} is {value}."
        text = []
        order = rng.sample(range(len(paragraphs)), len(paragraphs))
        question = f"What is the special magic number for {key}?"
        for j in order:
            text.append(paragraphs[j])
            body = "\n".join(text[: len(text) // 2] + [needle] + text[len(text) // 2:])
            conv = [{"role": "user", "content": f"{body}\n\n{question}"}]
            if n_tokens(tokenizer, conv) >= length:
                break
        out.append(conv)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    folder = str(teacher_path())
    tokenizer = apply_training_template(AutoTokenizer.from_pretrained(folder))
    sets = {length: prompts(tokenizer, length, args.items) for length in (1024, 2048)}
    engines = {
        "vllm": VLLMEngine(folder, max_model_len=4096, chat_template=None),
        "transformers": TransformersEngine(folder, batch_size=args.items, chat_template=None),
    }
    for engine in engines.values():
        engine.tokenizer.chat_template = tokenizer.chat_template
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    totals = {(e, n): [0.0, 0, 0] for e in engines for n in sets}  # seconds, items, tokens
    for _ in range(args.rounds):
        for length, convs in sets.items():
            for name, engine in engines.items():
                started = time.perf_counter()
                outs = engine.chat(convs, sampling)
                elapsed = time.perf_counter() - started
                prompt_tokens = sum(n_tokens(tokenizer, c) for c in convs)
                slot = totals[(name, length)]
                slot[0] += elapsed
                slot[1] += len(convs)
                slot[2] += prompt_tokens + sum(o[0].tokens for o in outs)
    for length in sets:
        rates = {}
        for name in engines:
            seconds, items, tokens = totals[(name, length)]
            rates[name] = tokens / seconds
            print(f"{length:>5} tokens  {name:<12} {items / seconds:7.2f} items/s  {tokens / seconds:9.0f} tokens/s")
        print(f"{length:>5} tokens  vllm / transformers: {rates['vllm'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
