"""Write `configs/prompts/distill.jsonl`: the prompt corpus the draft is distilled on.

The prompts are written for this project: task templates × topics (writing, role-play,
reasoning, math, coding, extraction, science, humanities, translation, summarisation, question
answering, reading comprehension), and passages taken from the docstrings of Python's standard
library (summarise / explain / answer a question about them). Nothing is read from
`../shared/data/` (the evaluation prompts). Deterministic: a fixed seed, sorted module walk.

    python scripts/make_distill_prompts.py [--n 2400] [--out configs/prompts/distill.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

# fmt: off
TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "volcanoes",
    "the water cycle", "compound interest", "the Roman Empire", "climate change", "vaccines",
    "plate tectonics", "the printing press", "electric cars", "coral reefs", "the human heart",
    "renewable energy", "the stock market", "ancient Egypt", "quantum computers", "honeybees",
    "the Silk Road", "jazz music", "the immune system", "supply and demand", "the Moon landing",
    "recycling", "the Industrial Revolution", "DNA", "earthquakes", "the Olympic Games",
    "social media", "rainforests", "inflation", "the Renaissance", "solar panels", "sleep",
    "chess", "the internet", "bicycles", "coffee", "the Great Wall of China", "antibiotics",
    "tides", "democracy", "glaciers", "photography", "the periodic table", "migration of birds",
    "urban gardening", "public libraries", "the theory of evolution", "wind turbines",
    "the Cold War", "meditation", "3D printing", "the Amazon river", "nutrition", "tea",
    "the solar system", "blockchain", "volunteering", "remote work", "dinosaurs", "mathematics",
    "the stock of fish in oceans", "classical music", "minimalism", "space telescopes",
    "learning a new language", "time management", "board games", "bread baking", "mountains",
]
PEOPLE = [
    "a pirate captain", "a medieval knight", "a tired detective", "a cheerful robot",
    "a travel guide in Kyoto", "a strict chess coach", "a friendly librarian", "an astronaut",
    "a nervous job applicant", "a wise old tree", "a sports commentator", "a chef in Naples",
    "a museum curator", "a time traveller from 2300", "a lighthouse keeper", "a park ranger",
]
WRITING = [
    "Write a short poem about {t}.", "Write a haiku about {t}.",
    "Write a persuasive paragraph arguing that schools should teach more about {t}.",
    "Write a blog post introduction about {t}.", "Write a short story that involves {t}.",
    "Draft a polite email to a colleague asking for feedback on a report about {t}.",
    "Write a product description for a board game themed around {t}.",
    "Write a limerick about {t}.", "Write a motivational speech for students about {t}.",
    "Compose a tweet announcing a new podcast episode on {t}.",
    "Write a diary entry from someone who just learned about {t}.",
]
ROLEPLAY = [
    "Pretend you are {p}. Describe your typical day.",
    "You are {p}. Explain {t} to a curious child.",
    "Act as {p} and give me advice about {t}.",
    "Imagine you are {p}. Introduce yourself in a few sentences.",
    "Role-play as {p} welcoming a new visitor.",
]
QA = [
    "What is {t}?", "Explain {t} in simple terms.", "Why is {t} important?",
    "Give three interesting facts about {t}.", "What are the pros and cons of {t}?",
    "How would you explain {t} to a ten-year-old?", "Summarize the history of {t}.",
    "What are common misconceptions about {t}?", "List five key terms related to {t}.",
    "Compare {t} and {u}.", "How are {t} and {u} related?",
    "What questions would a student ask about {t}? Answer two of them.",
]
REASONING = [
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain.",
    "Tom is taller than Ann, and Ann is taller than {n}. Who is the shortest? Explain.",
    "A farmer has {x} sheep. All but {y} run away. How many are left? Explain your reasoning.",
    "Sarah has {x} apples. She gives {y} to a friend and buys {z} more. How many does she have?",
    "There are {x} people in a room and each shakes hands with every other person once. "
    "How many handshakes are there?",
    "What comes next in the sequence {seq}? Explain the pattern.",
]
MATH = [
    "What is {x} times {y}?", "Compute {x} + {y} - {z}.", "What is {x}% of {y}?",
    "Solve for x: {x}x + {y} = {z}.", "What is the area of a rectangle {x} cm by {y} cm?",
    "A shop sells pens at {x} cents each. How much do {y} pens cost in dollars?",
    "Is {x} a prime number? Explain.", "What is the greatest common divisor of {x} and {y}?",
    "A car travels {x} km in {y} hours. What is its average speed?",
    "Convert {x} minutes into hours and minutes.", "What is the square root of {sq}?",
    "A recipe needs {x} eggs for {y} people. How many eggs for {z} people?",
]
CODE = [
    "Write a Python function that {c}.", "Write a JavaScript function that {c}.",
    "Explain how you would write a program that {c}.", "Write a C function that {c}.",
    "Write a Python class that {c2}.", "What is the time complexity of a function that {c}?",
    "Write unit tests in Python for a function that {c}.", "Write a SQL query that {q}.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a bash command that {sh}.", "Fix the bug: `def add(a, b): return a - b`.",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the vowels in a word",
    "returns the largest element of a list", "computes the factorial of n",
    "removes duplicates from a list while keeping order", "checks if a string is a palindrome",
    "merges two dictionaries", "flattens a nested list", "computes Fibonacci numbers",
    "finds the second smallest number in a list", "converts Celsius to Fahrenheit",
    "counts word frequencies in a text", "sorts a list of tuples by the second element",
    "checks whether two strings are anagrams", "returns the n-th triangular number",
    "parses a date string like 2024-05-01", "computes the mean and median of a list",
    "finds all pairs in a list that sum to a target", "rotates a list by k positions",
    "validates an email address with a simple rule", "transposes a matrix",
    "computes the binary representation of an integer", "capitalizes every word in a sentence",
]
CLASS_TASKS = [
    "represents a bank account with deposit and withdraw methods", "implements a stack",
    "implements a queue with two stacks", "models a to-do list", "represents a 2D point",
    "implements a simple LRU cache", "represents a rectangle with area and perimeter",
]
SQL = [
    "selects all customers from Canada", "counts orders per customer",
    "finds the three most expensive products", "lists employees hired after 2020",
    "computes the average salary per department",
]
BASH = ["counts lines in all .txt files", "finds files larger than 10 MB",
        "lists the five most recently modified files", "replaces 'foo' with 'bar' in a file"]
TRANSLATE = [
    "Translate into French: '{s}'", "Translate into Spanish: '{s}'",
    "Translate into German: '{s}'", "How do you say '{s}' in Italian?",
    "Translate this sentence into Portuguese: '{s}'",
]
SENTENCES = [
    "The weather is lovely today.", "Where is the nearest train station?",
    "I would like a cup of coffee, please.", "My brother is learning to play the guitar.",
    "We are going to the museum tomorrow.", "Can you help me find my keys?",
    "This book is more interesting than the film.", "The children are playing in the garden.",
    "Please close the window before you leave.", "I have been waiting for an hour.",
    "How much does this jacket cost?", "She reads the newspaper every morning.",
]
PASSAGE = [
    "Summarize the following text in two sentences:\n\n{d}",
    "Explain in plain words what this documentation says:\n\n{d}",
    "Read the passage and list its main points:\n\n{d}",
    "Write a one-line summary of this text:\n\n{d}",
    "Based on the passage below, what is the described module or function used for?\n\n{d}",
    "Extract the names of any functions, classes or parameters mentioned here:\n\n{d}",
    "Rewrite this text so that a beginner can understand it:\n\n{d}",
]
CATEGORIES = {"writing": WRITING, "roleplay": ROLEPLAY, "qa": QA, "reasoning": REASONING,
              "math": MATH, "code": CODE, "translation": TRANSLATE}  # fmt: skip
NOUNS = ["cats", "dogs", "birds", "artists", "doctors", "runners", "teachers", "pilots"]
# fmt: on


def stdlib_passages(limit: int, rng: random.Random) -> list[str]:
    """Docstrings (150-700 characters) of standard-library modules, classes and functions."""
    out = []
    skip = re.compile(r"^(test|idlelib|tkinter|turtle|antigravity|this|_|lib2to3|ensurepip)")
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.find(
        "site-packages") < 0 and not skip.match(m.name))  # fmt: skip
    for name in names:
        if name in sys.builtin_module_names or name.startswith("__"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                        and (inspect.isclass(v) or inspect.isfunction(v))]  # fmt: skip
        for o in objs:
            doc = inspect.getdoc(o) or ""
            doc = doc.strip()
            if 150 <= len(doc) <= 700 and ">>>" not in doc:
                out.append(doc)
    rng.shuffle(out)
    return sorted(set(out[:limit]), key=out.index)


def fill(tpl: str, rng: random.Random) -> str:
    t, u = rng.sample(TOPICS, 2)
    x, y, z = rng.randint(2, 99), rng.randint(2, 60), rng.randint(100, 999)
    start, step = rng.randint(1, 9), rng.randint(2, 7)
    a, b = rng.sample(NOUNS, 2)
    return tpl.format(  # fmt: skip
        t=t,
        u=u,
        p=rng.choice(PEOPLE),
        x=x,
        y=y,
        z=z,
        sq=rng.randint(2, 30) ** 2,
        seq=", ".join(str(start + step * i) for i in range(5)),
        n=rng.choice(["Bob", "Cleo"]),
        a=a,
        b=b,
        c=rng.choice(CODE_TASKS),
        c2=rng.choice(CLASS_TASKS),
        q=rng.choice(SQL),
        sh=rng.choice(BASH),
        s=rng.choice(SENTENCES),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2400, help="number of prompts")
    ap.add_argument("--out", type=Path, default=Path("configs/prompts/distill.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    n_passage = args.n // 6
    passages = stdlib_passages(n_passage, rng)
    records, seen = [], set()
    for d in passages:
        text = rng.choice(PASSAGE).format(d=d)
        records.append({"category": "passage", "prompt": text})
        seen.add(text)
    cats = sorted(CATEGORIES)
    tries = 0
    while len(records) < args.n and tries < 50 * args.n:
        tries += 1
        cat = cats[tries % len(cats)]
        text = fill(rng.choice(CATEGORIES[cat]), rng)
        if text not in seen:
            seen.add(text)
            records.append({"category": cat, "prompt": text})
    rng.shuffle(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {len(records)} prompts ({len(passages)} stdlib passages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
