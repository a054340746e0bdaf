#!/usr/bin/env python3
"""eval_cloze.py URL MODEL TEXT [--items 200] [--context 200] [--ending 40]
       [--choices 4] [--seed 1] [--batch 8]

A multiple-choice reading test of a character language model, asked of a
running server the way evaluation harnesses ask an OpenAI-style
completions endpoint: each item is a passage of TEXT (CONTEXT characters)
and CHOICES endings of ENDING characters, the true one and others taken
from elsewhere in the text; every passage + ending goes to
POST URL/v1/completions with "echo": true, "max_tokens": 0 and
"logprobs": 1, several prompts a request, and the model's answer is the
ending whose tokens have the largest summed log-probability after the
passage.  Prints the accuracy (chance is 1 / CHOICES), how often the true
ending is what greedy decoding writes (each token its position's first
alternative), and the tokens scored per second.

The endings' tokens are the last ones of each echoed prompt: a character
model has a token a character, which the script checks against the
"tokens" the server returns.  Use a held-out text (for models/austen,
../shared/data/austen/persuasion.txt).  Standard library only.
"""
import argparse
import json
import random
import sys
import time
import urllib.request


def items_of(text, a):
    """(passage, endings, index of the true one), endings starting at a
    word and never the true one's neighbourhood."""
    rng = random.Random(a.seed)
    span = a.context + a.ending
    out = []
    while len(out) < a.items:
        at = rng.randrange(0, len(text) - span)
        passage, true = text[at:at + a.context], text[at + a.context:at + span]
        endings = [true]
        while len(endings) < a.choices:
            other = rng.randrange(0, len(text) - a.ending)
            if abs(other - at) > 10 * span:
                endings.append(text[other:other + a.ending])
        rng.shuffle(endings)
        out.append((passage, endings, endings.index(true)))
    return out


def complete(url, model, prompts):
    body = json.dumps({"model": model, "prompt": prompts, "echo": True, "max_tokens": 0,
                       "logprobs": 1}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def ending_score(choice, ending):
    lp = choice["logprobs"]
    tokens, lps, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
    n = len(ending)
    if "".join(tokens[-n:]) != ending:
        sys.exit("the echoed tokens do not end with the ending: not a character model?")
    greedy = all(l == max(t.values()) for l, t in zip(lps[-n:], tops[-n:]))
    return sum(lps[-n:]), greedy, len(tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--ending", type=int, default=40)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="items a request")
    a = ap.parse_args()
    with open(a.text, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    items = items_of(text, a)
    right = greedy_true = tokens = 0
    t0 = time.monotonic()
    for at in range(0, len(items), a.batch):
        batch = items[at:at + a.batch]
        prompts = [p + e for p, endings, _ in batch for e in endings]
        choices = complete(a.url, a.model, prompts)["choices"]
        for k, (passage, endings, true) in enumerate(batch):
            scored = [ending_score(choices[k * a.choices + i], e) for i, e in enumerate(endings)]
            best = max(range(a.choices), key=lambda i: scored[i][0])
            right += best == true
            greedy_true += scored[true][1]
            tokens += sum(s[2] for s in scored)
    secs = time.monotonic() - t0
    print(f"{a.model} on {a.text}: {right}/{len(items)} right ({100.0 * right / len(items):.1f}%; "
          f"chance {100.0 / a.choices:.1f}%), the true ending greedy in {greedy_true}, "
          f"{tokens} tokens scored in {secs:.1f} s ({tokens / secs:.0f} tokens/s)")


if __name__ == "__main__":
    main()
