"""The built-in synthetic multi-hop dataset: questions with gold passage chains over a seeded fictional world.

It is the project's offline default and test bed: a few hundred short passages, so retrieval and small models
run on a CPU in minutes, and facts no model can know, so every answer has to come from retrieval.
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from dspy.evaluate.metrics import normalize_text

from steper_dspy.errors import SteperError
from steper_dspy.evals.datasets.synthetic_world import Organisation, Person, Work, World, build_world
from steper_dspy.evals.datasets.types import MultiHopDataset, make_example


@dataclass(frozen=True)
class _Question:
    question: str
    answer: str
    chain: tuple[str, ...]  # passage titles in hop order
    type: str


_Template = Callable[[World, random.Random], _Question | None]

# Share of each kind of question; 2-hop bridges are the most common, as in HotpotQA.
_MIX: dict[str, float] = {
    "bridge": 0.36,
    "comparison2": 0.14,
    "compositional3": 0.26,
    "compositional4": 0.12,
    "comparison4": 0.12,
}


def synthetic_multihop(*, seed: int = 0, num_questions: int = 120) -> MultiHopDataset:
    """Generate the synthetic multi-hop dataset.

    Questions are 2-hop bridges ("In which city was the author of the novel X born?"), 2-hop comparisons
    ("Where was the elder of A and B born?"), 3- and 4-hop compositions ("In which country is the employer of
    the director of the film X headquartered?") and 4-hop comparisons ("Who was born first, the author of the
    novel X or the director of the film Y?"). No question contains its answer.

    Args:
        seed: Seed of the world and the questions; the same seed gives the same dataset in every process.
        num_questions: How many questions to draw (the world grows with it, about 250 passages per 200).

    Returns:
        The dataset; its examples also carry `gold_chain`, the supporting titles in hop order.

    Raises:
        SteperError: `num_questions` is not a positive whole number.
    """
    if not isinstance(num_questions, int) or isinstance(num_questions, bool) or num_questions < 1:
        raise SteperError(f"num_questions must be a whole number >= 1, got {num_questions!r}.")
    rng = random.Random(seed)
    world = build_world(rng, scale=math.ceil(num_questions / 200))
    questions = []
    for family, quota in _quotas(num_questions).items():
        questions += _draw(world, rng, _TEMPLATES[family], quota, taken={q.question for q in questions})
    rng.shuffle(questions)
    examples = [
        make_example(
            id=f"synthetic-{seed}-{i:04d}",
            question=q.question,
            answer=q.answer,
            answer_aliases=[],
            supporting_titles=list(q.chain),
            type=q.type,
            hops=len(q.chain),
            gold_chain=list(q.chain),
        )
        for i, q in enumerate(questions)
    ]
    corpus = [{"title": title, "text": text} for title, text in world.passages()]
    return MultiHopDataset(name="synthetic", examples=examples, corpus=corpus)


def _quotas(total: int) -> dict[str, int]:
    """Split `total` over `_MIX` by largest remainder (ties broken by `_MIX` order, so it is deterministic)."""
    exact = {family: total * share for family, share in _MIX.items()}
    quotas = {family: math.floor(value) for family, value in exact.items()}
    by_remainder = sorted(_MIX, key=lambda f: (-(exact[f] - quotas[f]), list(_MIX).index(f)))
    for family in by_remainder[: total - sum(quotas.values())]:
        quotas[family] += 1
    return quotas


def _draw(world: World, rng: random.Random, templates: list[_Template], quota: int, taken: set[str]) -> list[_Question]:
    questions: list[_Question] = []
    attempts = 0
    while len(questions) < quota:
        attempts += 1
        if attempts > 1000 + 200 * quota:
            raise SteperError(f"Could not draw {quota} distinct synthetic questions; ask for fewer questions.")
        q = templates[attempts % len(templates)](world, rng)
        if q is None or q.question in taken or not _valid(q):
            continue
        taken.add(q.question)
        questions.append(q)
    return questions


def _valid(q: _Question) -> bool:
    # Each hop must need its own passage, and the answer must not be readable off the question.
    answer = f" {normalize_text(q.answer)} "
    return len(set(q.chain)) == len(q.chain) and answer not in f" {normalize_text(q.question)} "


# --- entity helpers ---------------------------------------------------------------------------------------------


def _works(world: World, kind: str) -> list[Work]:
    return [w for w in world.works if w.kind == kind]


def _two(rng: random.Random, items: list) -> tuple:
    first, second = rng.sample(items, 2)
    return first, second


def _creator(world: World, work: Work) -> Person:
    return world.person[work.creator]


def _employer(world: World, person: Person) -> Organisation:
    return world.org[person.employer]


def _founder(world: World, org: Organisation) -> Person:
    return world.person[org.founder]


def _country_of(world: World, city: str) -> str:
    return world.city[city].country


# --- 2-hop bridges ----------------------------------------------------------------------------------------------


def _novel_author_city(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "novel"))
    a = _creator(world, w)
    return _Question(f"In which city was the author of the novel {w.title} born?", a.city, (w.title, a.name), "bridge")


def _film_director_year(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "film"))
    d = _creator(world, w)
    return _Question(
        f"In what year was the director of the film {w.title} born?", str(d.born), (w.title, d.name), "bridge"
    )


def _person_employer_city(world: World, rng: random.Random) -> _Question:
    p = rng.choice(world.people)
    e = _employer(world, p)
    return _Question(f"In which city is the employer of {p.name} headquartered?", e.city, (p.name, e.name), "bridge")


def _person_country(world: World, rng: random.Random) -> _Question:
    p = rng.choice(world.people)
    return _Question(f"In which country was {p.name} born?", _country_of(world, p.city), (p.name, p.city), "bridge")


def _novel_publisher_founded(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "novel"))
    o = world.org[w.org]
    return _Question(
        f"In what year was the publisher of the novel {w.title} founded?", str(o.founded), (w.title, o.name), "bridge"
    )


def _film_studio_founder(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "film"))
    o = world.org[w.org]
    return _Question(
        f"Who founded the studio that produced the film {w.title}?", o.founder, (w.title, o.name), "bridge"
    )


def _org_founder_city(world: World, rng: random.Random) -> _Question:
    o = rng.choice(world.organisations)
    f = _founder(world, o)
    return _Question(f"In which city was the founder of {o.name} born?", f.city, (o.name, f.name), "bridge")


# --- 2-hop comparisons ------------------------------------------------------------------------------------------


def _elder_birthplace(world: World, rng: random.Random) -> _Question | None:
    a, b = _two(rng, world.people)
    if a.born == b.born:
        return None
    elder = min(a, b, key=lambda p: p.born)
    return _Question(f"Where was the elder of {a.name} and {b.name} born?", elder.city, (a.name, b.name), "comparison")


def _older_org_founded(world: World, rng: random.Random) -> _Question | None:
    x, y = _two(rng, world.organisations)
    if x.founded == y.founded:
        return None
    return _Question(
        f"When was the older of {x.name} and {y.name} founded?",
        str(min(x.founded, y.founded)),
        (x.name, y.name),
        "comparison",
    )


def _earlier_film_director(world: World, rng: random.Random) -> _Question | None:
    f, g = _two(rng, _works(world, "film"))
    if f.year == g.year:
        return None
    earlier = min(f, g, key=lambda w: w.year)
    return _Question(
        f"Who directed the earlier of the films {f.title} and {g.title}?",
        earlier.creator,
        (f.title, g.title),
        "comparison",
    )


def _earlier_novel_publisher(world: World, rng: random.Random) -> _Question | None:
    b, c = _two(rng, _works(world, "novel"))
    if b.year == c.year:
        return None
    earlier = min(b, c, key=lambda w: w.year)
    return _Question(
        f"Which company published the earlier of the novels {b.title} and {c.title}?",
        earlier.org,
        (b.title, c.title),
        "comparison",
    )


# --- 3-hop compositions -----------------------------------------------------------------------------------------


def _work_creator_country(kind: str, role: str) -> _Template:
    def template(world: World, rng: random.Random) -> _Question:
        w = rng.choice(_works(world, kind))
        p = _creator(world, w)
        return _Question(
            f"In which country was the {role} of the {kind} {w.title} born?",
            _country_of(world, p.city),
            (w.title, p.name, p.city),
            "compositional",
        )

    return template


def _film_director_employer_city(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "film"))
    d = _creator(world, w)
    e = _employer(world, d)
    return _Question(
        f"In which city is the employer of the director of the film {w.title} headquartered?",
        e.city,
        (w.title, d.name, e.name),
        "compositional",
    )


def _novel_author_employer_founded(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "novel"))
    a = _creator(world, w)
    e = _employer(world, a)
    return _Question(
        f"In what year was the employer of the author of the novel {w.title} founded?",
        str(e.founded),
        (w.title, a.name, e.name),
        "compositional",
    )


def _novel_publisher_founder_born(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "novel"))
    o = world.org[w.org]
    f = _founder(world, o)
    return _Question(
        f"In what year was the founder of the publisher of the novel {w.title} born?",
        str(f.born),
        (w.title, o.name, f.name),
        "compositional",
    )


def _film_studio_country(world: World, rng: random.Random) -> _Question:
    w = rng.choice(_works(world, "film"))
    o = world.org[w.org]
    return _Question(
        f"In which country is the studio that produced the film {w.title} headquartered?",
        _country_of(world, o.city),
        (w.title, o.name, o.city),
        "compositional",
    )


# --- 4-hop compositions -----------------------------------------------------------------------------------------


def _work_creator_employer_country(kind: str, role: str) -> _Template:
    def template(world: World, rng: random.Random) -> _Question:
        w = rng.choice(_works(world, kind))
        p = _creator(world, w)
        e = _employer(world, p)
        return _Question(
            f"In which country is the employer of the {role} of the {kind} {w.title} headquartered?",
            _country_of(world, e.city),
            (w.title, p.name, e.name, e.city),
            "compositional",
        )

    return template


def _work_org_founder_country(kind: str, org_phrase: str) -> _Template:
    def template(world: World, rng: random.Random) -> _Question:
        w = rng.choice(_works(world, kind))
        o = world.org[w.org]
        f = _founder(world, o)
        return _Question(
            f"In which country was the founder of the {org_phrase} {kind} {w.title} born?",
            _country_of(world, f.city),
            (w.title, o.name, f.name, f.city),
            "compositional",
        )

    return template


# --- 4-hop comparisons ------------------------------------------------------------------------------------------


def _author_or_director_born_first(world: World, rng: random.Random) -> _Question | None:
    b, f = rng.choice(_works(world, "novel")), rng.choice(_works(world, "film"))
    a, d = _creator(world, b), _creator(world, f)
    if a.born == d.born:
        return None
    first = min(a, d, key=lambda p: p.born)
    return _Question(
        f"Who was born first, the author of the novel {b.title} or the director of the film {f.title}?",
        first.name,
        (b.title, a.name, f.title, d.name),
        "comparison",
    )


def _publisher_or_studio_founded_first(world: World, rng: random.Random) -> _Question | None:
    b, f = rng.choice(_works(world, "novel")), rng.choice(_works(world, "film"))
    p, s = world.org[b.org], world.org[f.org]
    if p.founded == s.founded:
        return None
    first = min(p, s, key=lambda o: o.founded)
    return _Question(
        f"Which was founded earlier, the publisher of the novel {b.title} or the studio that produced the film "
        f"{f.title}?",
        first.name,
        (b.title, p.name, f.title, s.name),
        "comparison",
    )


_TEMPLATES: dict[str, list[_Template]] = {
    "bridge": [
        _novel_author_city,
        _film_director_year,
        _person_employer_city,
        _person_country,
        _novel_publisher_founded,
        _film_studio_founder,
        _org_founder_city,
    ],
    "comparison2": [_elder_birthplace, _older_org_founded, _earlier_film_director, _earlier_novel_publisher],
    "compositional3": [
        _work_creator_country("novel", "author"),
        _work_creator_country("film", "director"),
        _film_director_employer_city,
        _novel_author_employer_founded,
        _novel_publisher_founder_born,
        _film_studio_country,
    ],
    "compositional4": [
        _work_creator_employer_country("film", "director"),
        _work_creator_employer_country("novel", "author"),
        _work_org_founder_country("novel", "publisher of the"),
        _work_org_founder_country("film", "studio that produced the"),
    ],
    "comparison4": [_author_or_director_born_first, _publisher_or_studio_founded_first],
}
