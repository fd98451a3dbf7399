"""Built-in demo task: GSM8K-format arithmetic word problems, generated from a seed.

Why a generator: `make demo` must run offline with no external data, and it needs a task the base
SmolLM2-135M-Instruct fails at yet learns within a few hundred short examples, so that the task
gain (and the forgetting that comes with it) is large and unmistakable.

Each problem takes 2-3 steps on small whole numbers (none above 60, no remainders, no negatives:
even so, a 135M model still slips on sums such as 4+15 after a few hundred examples, so larger
numbers would only hide the gain), and the worked solution is one short sentence per step, then
`#### <answer>` as in GSM8K. Unlike GSM8K we leave out the `<<48/2=24>>` calculator notes: they
double the answer length and teach nothing a 135M model can use. A typical row:

    question: "Tom has 12 apples. He buys 3 bags of 4 apples each. How many apples does he have
               now?"
    answer:   "He buys 3*4=12 apples.\\nHe has 12+12=24 apples now.\\n#### 24"

Measured on the first 30 test problems (seed 0, prompt "Question: {q}\nAnswer:", greedy): the base
SmolLM2-135M-Instruct solves 1/30 (it answers one number or rambles); fully fine-tuned (lr 1e-4,
batch 8) it solves 9/30 after 96 training examples and 22/30 after 552.

Train and test are disjoint by construction: a problem's *skeleton* (its template and numbers,
not its names or items) is hashed, and the hash alone decides its split. So no test problem
appears in train, not even with other names, whatever the seeds and sizes of the two draws.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from cftune.errors import CftuneError

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of problem skeletons reserved for the test split
SPLIT_SIZES = {"train": 5485, "test": 1374}  # distinct skeletons, counted by sampling 1M
MAX_MISSES = 20_000  # consecutive draws that are duplicates or of the other split

NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"),
         ("Mia", "she"), ("Leo", "he"), ("Emma", "she"), ("Max", "he"), ("Zoe", "she"))
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "cards", "books", "shells")
PACKS = ("bags", "boxes", "packs")
GOODS = ("notebooks", "pens", "toys", "cups", "hats")


@dataclass(frozen=True)
class Problem:
    """One generated problem: `numbers` (with the template name) decide its split."""

    template: str
    numbers: tuple[int, ...]
    question: str
    steps: tuple[str, ...]
    answer: int

    def row(self) -> dict[str, str]:
        """The GSM8K row: `{"question", "answer"}`, the final answer after `#### `."""
        solution = "\n".join(self.steps)
        return {"question": self.question, "answer": f"{solution}\n#### {self.answer}"}


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str  # "he" | "she"

    @property
    def He(self) -> str:  # reads like the sentence it builds
        return self.pronoun.capitalize()


def _person(rng: random.Random, exclude: str = "") -> Person:
    return Person(*rng.choice([n for n in NAMES if n[0] != exclude]))


def _buy_packs(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 15), rng.randint(2, 5), rng.randint(2, 6)
    p, item, pack = _person(rng), rng.choice(ITEMS), rng.choice(PACKS)
    x = b * c
    return Problem("buy_packs", (a, b, c),
                   f"{p.name} has {a} {item}. {p.He} buys {b} {pack} of {c} {item} each. "
                   f"How many {item} does {p.pronoun} have now?",
                   (f"{p.He} buys {b}*{c}={x} {item}.", f"{p.He} has {a}+{x}={a + x} {item} now."),
                   a + x)


def _give_and_find(rng: random.Random) -> Problem:
    a = rng.randint(8, 25)
    b, c = rng.randint(2, a - 2), rng.randint(2, 12)
    p, item = _person(rng), rng.choice(ITEMS)
    q = _person(rng, exclude=p.name)
    x = a - b
    return Problem("give_and_find", (a, b, c),
                   f"{p.name} has {a} {item}. {p.He} gives {b} {item} to {q.name} and then finds "
                   f"{c} more. How many {item} does {p.name} have now?",
                   (f"After giving, {p.pronoun} has {a}-{b}={x} {item}.",
                    f"Then {p.pronoun} has {x}+{c}={x + c} {item}."),
                   x + c)


def _change(rng: random.Random) -> Problem:
    a, price = rng.randint(2, 5), rng.randint(2, 6)
    cost = a * price
    bill = rng.choice([b for b in (10, 20, 50) if b > cost])
    p, good = _person(rng), rng.choice(GOODS)
    return Problem("change", (a, price, bill),
                   f"{p.name} buys {a} {good} for ${price} each. {p.He} pays with a ${bill} bill. "
                   f"How much change does {p.pronoun} get?",
                   (f"The {good} cost {a}*{price}=${cost}.",
                    f"The change is {bill}-{cost}=${bill - cost}."),
                   bill - cost)


def _share(rng: random.Random) -> Problem:
    k, each = rng.randint(2, 5), rng.randint(2, 8)
    total = k * each
    a = rng.randint(2, total - 2)
    b = total - a
    p, item = _person(rng), rng.choice(ITEMS)
    return Problem("share", (a, b, k),
                   f"{p.name} has {a} {item} and buys {b} more. {p.He} shares them equally among "
                   f"{k} friends. How many {item} does each friend get?",
                   (f"{p.He} has {a}+{b}={total} {item}.",
                    f"Each friend gets {total}/{k}={each} {item}."),
                   each)


def _wage(rng: random.Random) -> Problem:
    rate, hours = rng.randint(2, 8), rng.randint(2, 6)
    earned = rate * hours
    spent = rng.randint(1, earned - 1)
    p = _person(rng)
    return Problem("wage", (rate, hours, spent),
                   f"{p.name} earns ${rate} an hour and works {hours} hours. Then {p.pronoun} "
                   f"spends ${spent}. How much money does {p.pronoun} have left?",
                   (f"{p.He} earns {rate}*{hours}=${earned}.",
                    f"{p.He} has {earned}-{spent}=${earned - spent} left."),
                   earned - spent)


def _buy_and_eat(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 12), rng.randint(2, 4), rng.randint(2, 6)
    x = b * c
    y = a + x
    d = rng.randint(2, y - 2)  # counts of items stay >= 2: no "1 apples"
    p, item, pack = _person(rng), rng.choice(ITEMS), rng.choice(PACKS)
    return Problem("buy_and_eat", (a, b, c, d),
                   f"{p.name} has {a} {item}. {p.He} buys {b} {pack} of {c} {item} each and then "
                   f"loses {d} {item}. How many {item} does {p.pronoun} have left?",
                   (f"{p.He} buys {b}*{c}={x} {item}.", f"{p.He} has {a}+{x}={y} {item}.",
                    f"{p.He} has {y}-{d}={y - d} {item} left."),
                   y - d)


def _times_as_many(rng: random.Random) -> Problem:
    a, k = rng.randint(2, 12), rng.randint(2, 4)
    x = a * k
    p, item = _person(rng), rng.choice(ITEMS)
    q = _person(rng, exclude=p.name)
    return Problem("times_as_many", (a, k),
                   f"{p.name} has {a} {item}. {q.name} has {k} times as many {item}. "
                   f"How many {item} do they have together?",
                   (f"{q.name} has {a}*{k}={x} {item}.",
                    f"Together they have {a}+{x}={a + x} {item}."),
                   a + x)


def _half_then_buy(rng: random.Random) -> Problem:
    a, b = 2 * rng.randint(2, 12), rng.randint(2, 12)
    x = a // 2
    p, item = _person(rng), rng.choice(ITEMS)
    return Problem("half_then_buy", (a, b),
                   f"{p.name} has {a} {item}. {p.He} gives half of them away and then buys {b} "
                   f"more. How many {item} does {p.pronoun} have now?",
                   (f"{p.He} keeps {a}/2={x} {item}.", f"{p.He} has {x}+{b}={x + b} {item} now."),
                   x + b)


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_packs, _give_and_find, _change, _share, _wage, _buy_and_eat, _times_as_many,
    _half_then_buy,
)


def split_of(problem: Problem) -> str:
    """The split a problem belongs to, from a hash of its skeleton (stable across runs/seeds)."""
    key = problem.template + ":" + ",".join(map(str, problem.numbers))
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct problems of `split`, the same for the same (split, n, seed).

    The draw is one seeded stream, so the first `n` problems of a larger draw equal a smaller draw.
    """
    if split not in SPLITS:
        raise CftuneError(
            f"builtin:arithmetic: split '{split}' is unknown; allowed: {', '.join(SPLITS)}"
        )
    if n < 0:
        raise CftuneError(f"builtin:arithmetic: n = {n} must be >= 0")
    rng = random.Random(f"cftune-arithmetic:{split}:{seed}")
    seen: set[tuple[str, tuple[int, ...]]] = set()
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        problem = rng.choice(TEMPLATES)(rng)
        skeleton = (problem.template, problem.numbers)
        if split_of(problem) != split or skeleton in seen:
            misses += 1
            if misses > MAX_MISSES:  # the split is (nearly) exhausted: fail, don't spin
                raise CftuneError(
                    f"builtin:arithmetic: could not draw {n} distinct {split} problems "
                    f"(got {len(out)}; the {split} split holds about {SPLIT_SIZES[split]}); "
                    "ask for fewer"
                )
            continue
        misses = 0
        seen.add(skeleton)
        out.append(problem)
    return out


def generate(split: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` GSM8K-format rows `{"question", "answer"}` of `split` ("train" | "test")."""
    return [p.row() for p in problems(split, n, seed)]
