"""A seeded fictional world (countries, cities, organisations, people, novels, films) written as passages.

Every name is built from random syllables, so no language model can know a fact about it: answering needs the
passages. Links point one way (a work names its creator, a person their birth city and employer, an
organisation its founder and seat, a city its country), so each hop of a question needs its own passage.
Only `random.Random(seed)` and lists are used, never hashing order, so a seed gives the same world in every
process.
"""

import random
from dataclasses import dataclass, field

_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "sh",
    "t",
    "th",
    "tr",
    "v",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ie"]
_CODAS = ["", "", "", "", "l", "n", "r", "s", "m", "th"]

_ADJECTIVES = [
    "Glass",
    "Silent",
    "Amber",
    "Hollow",
    "Iron",
    "Crimson",
    "Distant",
    "Broken",
    "Paper",
    "Winter",
    "Golden",
    "Quiet",
    "Salt",
    "Velvet",
    "Northern",
    "Last",
]
_NOUNS = [
    "Orchard",
    "Harbor",
    "Lantern",
    "River",
    "Garden",
    "Mirror",
    "Tower",
    "Voyage",
    "Island",
    "Bridge",
    "Letter",
    "Season",
    "Forest",
    "Crown",
    "Shadow",
    "Meadow",
]

_ORG_SUFFIXES = {
    "publisher": ["Press", "Books", "House"],
    "studio": ["Pictures", "Studios", "Films"],
    "company": ["Systems", "Works", "Holdings", "Mills", "Lines"],
}
_INDUSTRIES = ["shipping", "textile", "software", "mining", "railway", "brewing", "insurance"]
_OTHER_OCCUPATIONS = ["engineer", "painter", "architect", "banker", "actor", "chemist", "journalist"]
_AUTHOR_OCCUPATIONS = ["novelist", "writer"]
_STORY_SUBJECTS = [
    "a lighthouse keeper",
    "two sisters",
    "a travelling clockmaker",
    "a failed harvest",
    "a forgotten archive",
    "an exiled musician",
]


@dataclass
class Country:
    name: str
    capital: str = ""
    currency: str = ""


@dataclass
class City:
    name: str
    country: str
    river: str
    population: int


@dataclass
class Organisation:
    name: str
    kind: str  # "publisher" | "studio" | "company"
    industry: str
    city: str
    founder: str = ""
    founded: int = 0


@dataclass
class Person:
    name: str
    family: str
    occupation: str
    born: int
    city: str
    employer: str
    prize: str
    prize_year: int


@dataclass
class Work:
    title: str
    kind: str  # "novel" | "film"
    creator: str
    year: int
    org: str
    detail: str  # a subject (novel) or a cast member (film): noise that shares words with other passages


@dataclass
class World:
    countries: list[Country] = field(default_factory=list)
    cities: list[City] = field(default_factory=list)
    organisations: list[Organisation] = field(default_factory=list)
    people: list[Person] = field(default_factory=list)
    works: list[Work] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.city = {c.name: c for c in self.cities}
        self.org = {o.name: o for o in self.organisations}
        self.person = {p.name: p for p in self.people}

    def passages(self) -> list[tuple[str, str]]:
        """Every entity as `(title, text)`: 2 to 4 encyclopedia-style sentences titled with its name."""
        return (
            [(c.name, _country_text(c)) for c in self.countries]
            + [(c.name, _city_text(c, self)) for c in self.cities]
            + [(o.name, _org_text(o)) for o in self.organisations]
            + [(p.name, _person_text(p)) for p in self.people]
            + [(w.title, _work_text(w)) for w in self.works]
        )


class _Names:
    """Unique invented words; one shared pool, so a city never shares its name with a family or a company."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()  # membership only; never iterated

    def make(self, syllables: tuple[int, int] = (2, 2), suffix: str = "") -> str:
        while True:
            parts = [
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(self.rng.randint(*syllables))
            ]
            word = ("".join(parts) + suffix).capitalize()
            if 4 <= len(word) <= 9 and word not in self.used:
                self.used.add(word)
                return word

    def many(self, count: int, syllables: tuple[int, int] = (2, 2), suffix: str = "") -> list[str]:
        return [self.make(syllables, suffix) for _ in range(count)]


def build_world(rng: random.Random, *, scale: int = 1) -> World:
    """Draw a world; `scale` multiplies the number of cities, organisations, people and works."""
    names = _Names(rng)
    countries = [Country(name) for name in names.many(6, (1, 2), suffix="ia")]
    rivers = names.many(10)
    cities = []
    for i, name in enumerate(names.many(24 * scale, (2, 3))):
        country = countries[i % len(countries)]
        cities.append(City(name, country.name, rng.choice(rivers), rng.randrange(20, 900) * 1000))
    for country in countries:
        country.capital = next(c.name for c in cities if c.country == country.name)
        country.currency = f"{rng.choice(_ADJECTIVES).lower()} {names.make((1, 2)).lower()}"

    org_roots = names.many(14 * scale, (2, 2))
    organisations = []
    org_names: list[str] = []
    for kind, count in (("publisher", 8), ("studio", 8), ("company", 12)):
        for _ in range(count * scale):
            name = _fresh(rng, org_names, lambda k=kind: f"{rng.choice(org_roots)} {rng.choice(_ORG_SUFFIXES[k])}")
            organisations.append(Organisation(name, kind, rng.choice(_INDUSTRIES), rng.choice(cities).name))

    given, families = names.many(40 * scale, (1, 2)), names.many(45 * scale, (2, 2))
    people: list[Person] = []
    person_names: list[str] = []
    for role, count in (("author", 36), ("director", 28), ("other", 40)):
        for _ in range(count * scale):
            family = rng.choice(families)
            name = _fresh(rng, person_names, lambda f=family: f"{rng.choice(given)} {f}")
            occupation = {"author": rng.choice(_AUTHOR_OCCUPATIONS), "director": "film director"}.get(
                role, rng.choice(_OTHER_OCCUPATIONS)
            )
            born = rng.randint(1900, 1985)
            prize = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} Prize"
            people.append(
                Person(
                    name,
                    family,
                    occupation,
                    born,
                    rng.choice(cities).name,
                    rng.choice(organisations).name,
                    prize,
                    born + rng.randint(28, 34),
                )
            )

    founders = [p for p in people if p.born <= 1950]
    for org in organisations:
        founder = rng.choice(founders)
        org.founder, org.founded = founder.name, founder.born + rng.randint(25, 55)

    titles: list[str] = []
    works = []
    authors = [p for p in people if p.occupation in _AUTHOR_OCCUPATIONS]
    directors = [p for p in people if p.occupation == "film director"]
    actors = [p for p in people if p.occupation == "actor"] or people
    for kind, count, creators, kind_of_org in (("novel", 50, authors, "publisher"), ("film", 40, directors, "studio")):
        orgs = [o for o in organisations if o.kind == kind_of_org]
        for _ in range(count * scale):
            title = _fresh(rng, titles, lambda: _title(rng))
            creator = rng.choice(creators)
            year = creator.born + rng.randint(25, 35)
            # Keep the world consistent: a work comes out after its publisher or studio was founded.
            if founded := [o for o in orgs if o.founded <= year]:
                org = rng.choice(founded)
            else:
                org = min(orgs, key=lambda o: o.founded)
                year = org.founded + rng.randint(1, 10)
            detail = rng.choice(_STORY_SUBJECTS) if kind == "novel" else rng.choice(actors).name
            works.append(Work(title, kind, creator.name, year, org.name, detail))
    return World(countries, cities, organisations, people, works)


def _fresh(rng: random.Random, taken: list[str], draw) -> str:
    # `taken` is a list kept in draw order; the linear scan is cheap at this size and keeps everything ordered.
    while (name := draw()) in taken:
        pass
    taken.append(name)
    return name


def _title(rng: random.Random) -> str:
    adjective, noun = rng.choice(_ADJECTIVES), rng.choice(_NOUNS)
    if rng.random() < 0.7:
        return f"The {adjective} {noun}"
    return f"{noun} of the {adjective} {rng.choice(_NOUNS)}"


def _country_text(c: Country) -> str:
    return f"{c.name} is a country. Its capital is {c.capital}, and its currency is the {c.currency}."


def _city_text(c: City, world: World) -> str:
    text = (
        f"{c.name} is a city in {c.country}, on the river {c.river}. In 2010 it had about {c.population:,} inhabitants."
    )
    capitals = [country.name for country in world.countries if country.capital == c.name]
    return text + (f" It is the capital of {capitals[0]}." if capitals else "")


def _org_text(o: Organisation) -> str:
    description = {"publisher": "publishing house", "studio": "film studio"}.get(o.kind, f"{o.industry} company")
    return f"{o.name} is a {description} founded in {o.founded} by {o.founder}. Its headquarters are in {o.city}."


def _person_text(p: Person) -> str:
    return (
        f"{p.name} is a {p.occupation} born in {p.born} in {p.city}. {p.family} works for {p.employer}. "
        f"In {p.prize_year} {p.family} received the {p.prize}."
    )


def _work_text(w: Work) -> str:
    if w.kind == "novel":
        return (
            f"{w.title} is a novel by {w.creator}, published in {w.year} by {w.org}. It tells the story of {w.detail}."
        )
    return f"{w.title} is a {w.year} film directed by {w.creator}. It was produced by {w.org} and stars {w.detail}."
