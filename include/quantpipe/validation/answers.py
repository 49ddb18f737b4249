"""Answer flips: fixed prompts with a short factual or numeric answer.

Baseline and candidate answer each prompt greedily; the answer is the first word or
number of the continuation. The gated measure, per kind of answer (``fact``,
``yesno``, ``number``), is the share of the answers the baseline *knows* that the candidate
changes; known: right, and the first answer token had probability >= ``CONFIDENT``
under the baseline. A small model's guesses flip under any perturbation (a sound 4-bit
GPTQ changed 16 of 57 right but unsure sums), what it knows a sound quantization keeps,
and damage does not (measured: FP8 lost 1 of 28 right facts; a planted swap of
capital-city tokens lost 14 of 28, rotated digit rows 24 of 25 sums). All flips are
reported too. Prompts are built deterministically, so every run asks the same questions.
"""

from __future__ import annotations

import random
import re

_CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
             ("Canada", "Ottawa"), ("Australia", "Canberra"), ("China", "Beijing"), ("India", "New"),
             ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
             ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Argentina", "Buenos"), ("Mexico", "Mexico"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"),
             ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Cuba", "Havana"),
             ("the United Kingdom", "London"), ("the United States", "Washington"), ("South Korea", "Seoul"),
             ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
             ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Iran", "Tehran"),
             ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Vietnam", "Hanoi"),
             ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Malaysia", "Kuala"),
             ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
             ("the Czech Republic", "Prague"), ("Iceland", "Reykjavik"), ("Morocco", "Rabat"),
             ("Ethiopia", "Addis"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Jamaica", "Kingston"),
             ("Scotland", "Edinburgh"), ("Wales", "Cardiff"))
_FACTS = (("The chemical symbol for gold is", "Au"), ("The largest planet in our solar system is", "Jupiter"),
          ("The closest star to Earth is the", "Sun"), ("Water is made of hydrogen and", "oxygen"),
          ("The first president of the United States was George", "Washington"),
          ("The author of Romeo and Juliet is William", "Shakespeare"), ("The opposite of hot is", "cold"),
          ("The color of a clear daytime sky is", "blue"), ("A baby cat is called a", "kitten"),
          ("The number of days in a week is", "seven"), ("The freezing point of water in Celsius is", "0"),
          ("The planet known as the Red Planet is", "Mars"), ("Bees make", "honey"),
          ("The longest river in Africa is the", "Nile"), ("The fastest land animal is the", "cheetah"),
          ("The language spoken in Brazil is", "Portuguese"), ("The sun rises in the", "east"),
          ("Ice is frozen", "water"), ("The tallest animal in the world is the", "giraffe"),
          ("The largest ocean on Earth is the", "Pacific"), ("A spider has eight", "legs"),
          ("The currency of Japan is the", "yen"), ("The inventor of the telephone was Alexander Graham",
                                                    "Bell"),
          ("The theory of relativity was developed by Albert", "Einstein"),
          ("The Mona Lisa was painted by Leonardo da", "Vinci"), ("The square root of 81 is", "9"),
          ("The chemical symbol for water is", "H"), ("The first man on the Moon was Neil", "Armstrong"))
# yes/no questions of common knowledge, half each way: a fault that exchanges two answer
# tokens (a swapped pair of embedding rows) loses every one the baseline knows
_YESNO = (("Is water wet?", "yes"), ("Do birds have feathers?", "yes"), ("Is the Earth round?", "yes"),
          ("Do cats have four legs?", "yes"), ("Is the sky blue on a clear day?", "yes"), ("Is fire hot?", "yes"),
          ("Do fish swim?", "yes"), ("Is snow cold?", "yes"), ("Is Paris in France?", "yes"),
          ("Do cows give milk?", "yes"), ("Is a lemon sour?", "yes"), ("Is the ocean salty?", "yes"),
          ("Do plants need sunlight?", "yes"), ("Is gold a metal?", "yes"), ("Does the sun rise in the east?", "yes"),
          ("Is ice frozen water?", "yes"), ("Do dogs bark?", "yes"), ("Is a whale a mammal?", "yes"),
          ("Is Tokyo in Japan?", "yes"), ("Do people need water to live?", "yes"),
          ("Is the sun cold?", "no"), ("Can a fish ride a bicycle?", "no"), ("Is snow black?", "no"),
          ("Do cats have wings?", "no"), ("Is ice hot?", "no"), ("Is the Earth flat?", "no"),
          ("Do cows lay eggs?", "no"), ("Is a mouse bigger than an elephant?", "no"), ("Is Paris in Germany?", "no"),
          ("Can a stone speak?", "no"), ("Is sugar salty?", "no"), ("Do trees walk?", "no"),
          ("Is the moon made of cheese?", "no"), ("Is fire cold?", "no"), ("Do dogs have six legs?", "no"),
          ("Is London in China?", "no"), ("Is water dry?", "no"), ("Can people breathe under water unaided?", "no"),
          ("Is night brighter than day?", "no"), ("Do birds have fur?", "no"))
_FEWSHOT_YESNO = "Q: Is the sun hot?\nA: yes\nQ: Is grass red?\nA: no\nQ: Can a car swim?\nA: no\nQ: Is milk white?\nA: yes\n"
_FEWSHOT_ADD = "2 + 2 = 4\n3 + 5 = 8\n7 + 1 = 8\n"
_FEWSHOT_MUL = "2 * 3 = 6\n4 * 2 = 8\n3 * 3 = 9\n"
_FEWSHOT_SUB = "9 - 4 = 5\n7 - 2 = 5\n8 - 3 = 5\n"
CONFIDENT = 0.5
_WORD = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?")


def answer_prompts(seed: int = 0) -> list[dict]:
    """~250 prompts: capitals, facts, yes/no questions, and sums, products and differences
    of small numbers (few-shot, so even a small model answers with a number or yes/no)."""
    rng = random.Random(seed)
    out = [{"prompt": f"The capital of {c} is", "expected": a, "kind": "fact"} for c, a in _CAPITALS]
    out += [{"prompt": p, "expected": a, "kind": "fact"} for p, a in _FACTS]
    out += [{"prompt": f"{_FEWSHOT_YESNO}Q: {q}\nA:", "expected": a, "kind": "yesno"} for q, a in _YESNO]
    for shots, op, f in ((_FEWSHOT_ADD, "+", lambda a, b: a + b), (_FEWSHOT_MUL, "*", lambda a, b: a * b),
                         (_FEWSHOT_SUB, "-", lambda a, b: a - b)):
        pairs = [(a, b) for a in range(2, 20) for b in range(1, 10) if op != "-" or b <= a]
        for a, b in rng.sample(pairs, 40):  # 40 distinct questions per operation
            out.append({"prompt": f"{shots}{a} {op} {b} =", "expected": str(f(a, b)), "kind": "number"})
    return out


def first_answer(text: str) -> str:
    """The first word or number of a continuation, lower-cased ('' when there is none)."""
    m = _WORD.search(text.split("\n", 1)[0] if text.strip() else "")
    return m.group(0).lower() if m else ""


def answer_flips(baseline: list[dict], candidate: list[dict]) -> dict:
    """Per prompt: both answers and whether the answer changed. Prompts must match one to one."""
    if [b["prompt"] for b in baseline] != [c["prompt"] for c in candidate]:
        raise ValueError("answer prompts differ between baseline and candidate")
    rows = []
    for b, c in zip(baseline, candidate):
        ba, ca = first_answer(b["text"]), first_answer(c["text"])
        rows.append({"prompt": b["prompt"].split("\n")[-1], "kind": b.get("kind", ""), "expected": b.get("expected"),
                     "baseline": ba, "quantized": ca, "flipped": ba != ca, "p_first": b.get("p_first")})
    flipped = sum(r["flipped"] for r in rows)
    kinds = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        known = [r for r in rows if r["kind"] == kind and r["baseline"] == str(r["expected"]).lower()
                 and (r["p_first"] or 0.0) >= CONFIDENT]
        kinds[kind] = {"known": len(known), "lost": sum(r["flipped"] for r in known),
                       "prompts": sum(r["kind"] == kind for r in rows)}
    return {"flipped": flipped, "n": len(rows), "rate": flipped / len(rows) if rows else None, "kinds": kinds,
            "per_prompt": rows}
