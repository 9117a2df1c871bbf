"""Embedded default dataset: templated Q&A with a concise and a verbose answer.

Generated deterministically and offline in pure Python (stdlib only).  Every
prompt has two correct answers:

* concise -- just the fact, 1-5 words ("Isaac Newton.", "12.", "Red, yellow and blue.");
* verbose -- three sentences, 25-45 words, always opening with "The answer is",
  "Well, the answer is" or "Good question, the answer is", followed by template
  filler that reuses the question's entities.

The style is therefore identifiable from the first word of the answer (concise
answers never start with "The", "Well," or "Good").  The *set* of prompts for a given
``num_prompts`` does not depend on ``seed`` (prompt ``i`` always has the same
facts); ``seed`` only controls the order and the per-prompt style choice.

API: :func:`generate_rows`, :func:`generate_pairs`, :func:`corpus_text`.
"""
from __future__ import annotations

import random
import zlib
from typing import Iterable, Iterator

__all__ = ["generate_rows", "generate_pairs", "corpus_text", "STYLES", "VERBOSE_OPENERS",
           "VERBOSE_FIRST_WORDS", "MAX_PROMPTS"]

STYLES = ("concise", "verbose")
VERBOSE_OPENERS = ("The answer is {a}.", "Well, the answer is {a}.", "Good question, the answer is {a}.")
VERBOSE_FIRST_WORDS = frozenset(o.split()[0] for o in VERBOSE_OPENERS)
CONCISE_WORDS = (1, 5)
VERBOSE_WORDS = (25, 45)
MAX_PROMPTS = 20000


def _seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))  # stable across processes, unlike hash()


def _table(text: str) -> list[tuple[str, ...]]:
    items = [it for ln in text.strip().splitlines() for it in ln.split(";") if it.strip()]
    return [tuple(p.strip() for p in it.split("|")) for it in items]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _shuf(rng: random.Random, rows: list) -> list:
    rows = list(rows)
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- tables
_CAPITALS = _table("""
France|Paris; Germany|Berlin; Italy|Rome; Spain|Madrid; Japan|Tokyo; Egypt|Cairo; Canada|Ottawa
Australia|Canberra; Russia|Moscow; China|Beijing; India|New Delhi; Kenya|Nairobi; Norway|Oslo
Sweden|Stockholm; Greece|Athens; Portugal|Lisbon; Ireland|Dublin; Poland|Warsaw; Austria|Vienna; Peru|Lima
Chile|Santiago; Argentina|Buenos Aires; Turkey|Ankara; Thailand|Bangkok; Finland|Helsinki
Denmark|Copenhagen; Hungary|Budapest; Cuba|Havana
""")
_LANGUAGES = _table("""
France|French; Germany|German; Italy|Italian; Spain|Spanish; Japan|Japanese; Russia|Russian; Greece|Greek
Portugal|Portuguese; Poland|Polish; Finland|Finnish; Sweden|Swedish; Norway|Norwegian; Denmark|Danish
Hungary|Hungarian; Turkey|Turkish; Thailand|Thai; Brazil|Portuguese
""")
_PEOPLE = _table("""
discovered|the law of universal gravitation|Isaac Newton; discovered|penicillin|Alexander Fleming
invented|the telephone|Alexander Graham Bell; invented|the phonograph|Thomas Edison
developed|the theory of relativity|Albert Einstein; discovered|radium|Marie Curie
invented|the printing press|Johannes Gutenberg
proposed|the theory of evolution by natural selection|Charles Darwin
invented|the World Wide Web|Tim Berners-Lee; discovered|the four largest moons of Jupiter|Galileo Galilei
created|the periodic table|Dmitri Mendeleev; invented|dynamite|Alfred Nobel
made|the first powered airplane flight|Orville and Wilbur Wright; wrote|Romeo and Juliet|William Shakespeare
painted|the Mona Lisa|Leonardo da Vinci; composed|the Moonlight Sonata|Ludwig van Beethoven
wrote|Pride and Prejudice|Jane Austen; discovered|the laws of planetary motion|Johannes Kepler
invented|Morse code|Samuel Morse; invented|the cotton gin|Eli Whitney
discovered|the structure of DNA|Watson and Crick; developed|the first polio vaccine|Jonas Salk
discovered|X-rays|Wilhelm Roentgen; was the first person to walk on|the Moon|Neil Armstrong
painted|The Starry Night|Vincent van Gogh; composed|The Magic Flute|Wolfgang Amadeus Mozart
invented|the first electric battery|Alessandro Volta; wrote|the Odyssey|Homer
""")
_COLOURS = _table("""
a ripe banana|yellow; fresh grass|green; the clear sky on a sunny day|blue; fresh snow|white
a ripe tomato|red; coal|black; a lemon|yellow; a strawberry|red; milk|white; a crow|black; a pumpkin|orange
a plum|purple; chocolate|brown; an emerald|green; a ruby|red; a sapphire|blue; a polar bear|white
a flamingo|pink; a carrot|orange; a lime|green; an eggplant|purple; a fire truck|red; a pearl|white
a ripe cherry|red; a raven|black; a lettuce leaf|green; a blueberry|blue; the trunk of an oak tree|brown
""")
_DEFINITIONS = _table("""
a noun|a word that names something; a verb|a word for an action
an adjective|a word that describes something; a triangle|a shape with three sides
a square|a rectangle with equal sides; a circle|a perfectly round shape; a pentagon|a shape with five sides
a hexagon|a shape with six sides; an octagon|a shape with eight sides
a mammal|a warm-blooded animal with fur; a planet|a world orbiting a star
a dictionary|a book of word meanings; a library|a place for borrowing books
a thermometer|a tool that measures temperature; a herbivore|an animal that eats plants
a carnivore|an animal that eats meat; an island|land surrounded by water
a peninsula|land mostly surrounded by water; a desert|a very dry place
a volcano|a mountain that erupts lava; a glacier|a slow river of ice; a synonym|a word meaning the same
an antonym|a word with opposite meaning; a century|one hundred years; a decade|ten years
a dozen|twelve of something; a fortnight|two weeks; a continent|a very large landmass
a recipe|instructions for cooking a dish; a map|a drawing of an area; an author|a person who writes books
a pilot|a person who flies aircraft; a baker|a person who bakes bread; a dentist|a doctor for teeth
""")
_LISTS = _table("""
three primary colours|red, yellow and blue; the four seasons|spring, summer, autumn and winter
three states of matter|solid, liquid and gas; the four cardinal directions|north, south, east and west
the three main meals of the day|breakfast, lunch and dinner
the three colours of a traffic light|red, amber and green
the first three planets from the Sun|Mercury, Venus and Earth; the two largest planets|Jupiter and Saturn
the three primary colours of light|red, green and blue; the first three letters of the alphabet|A, B and C
the last three letters of the alphabet|X, Y and Z
the first three months of the year|January, February and March
the last three months of the year|October, November and December; the two colours of a zebra|black and white
three types of rock|igneous, sedimentary and metamorphic; the two largest oceans|Pacific and Atlantic
the three parts of an insect's body|head, thorax and abdomen
three things a plant needs to grow|light, water and air
""")
_OPPOSITES = _table("""
hot|cold; big|small; up|down; fast|slow; happy|sad; early|late; full|empty; high|low; hard|soft; wet|dry
old|new; long|short; thick|thin; loud|quiet; rich|poor; strong|weak; push|pull; inside|outside; left|right
day|night; win|lose; buy|sell; first|last; begin|end; heavy|light; near|far; clean|dirty; awake|asleep
true|false; above|below; before|after; give|take; cheap|expensive; friend|enemy; question|answer
north|south; east|west; enter|exit
""")
_SOUNDS = _table("""
a cow|moo; a dog|woof; a cat|meow; a sheep|baa; a duck|quack; a pig|oink; a horse|neigh; a lion|roar
an owl|hoot; a snake|hiss; a bee|buzz; a rooster|cock-a-doodle-doo; a mouse|squeak; a frog|ribbit
a donkey|hee-haw; a wolf|howl; a crow|caw; a turkey|gobble; a dove|coo; an elephant|trumpet
""")
_BABIES = _table("""
cow|a calf; dog|a puppy; cat|a kitten; sheep|a lamb; horse|a foal; pig|a piglet; goat|a kid; duck|a duckling
chicken|a chick; frog|a tadpole; kangaroo|a joey; lion|a cub; bear|a cub; deer|a fawn; swan|a cygnet
owl|an owlet; goose|a gosling; eagle|an eaglet; butterfly|a caterpillar; whale|a calf
""")
_LEGS = _table("""
cow|cows|4; horse|horses|4; dog|dogs|4; cat|cats|4; sheep|sheep|4; chicken|chickens|2; duck|ducks|2
goose|geese|2; spider|spiders|8; ant|ants|6; bee|bees|6; beetle|beetles|6
""")

# Syllables for synthetic (fictional) countries and capitals; disjoint sets.
_C_SYL = "val kor mer tan bel dor sim ral zen lum vor kel nar pel tor gal ber min sol dar".split()
_C_SUF = (("ia", "ian"), ("land", "ish"), ("ar", "ese"), ("onia", "onian"))
_K_SYL = "ka ri mo te lu sa pa ni go ve ho da fu ze bo li na ru to me".split()
_K_SUF = ("ton", "burg", "ville", "", "ra", "mont")


def _synthetic_world() -> Iterator[tuple[str, str, str]]:
    """Yield fictional (country, capital, language) triples (tens of thousands available)."""
    rng = random.Random(_seed("world"))
    used = {w for row in _CAPITALS + _LANGUAGES for w in row}
    misses = 0
    while misses < 1000:
        stem = "".join(rng.choice(_C_SYL) for _ in range(rng.choice((2, 2, 3))))
        suf, lang_suf = rng.choice(_C_SUF)
        country, language = _cap(stem + suf), _cap(stem + lang_suf)
        capital = _cap("".join(rng.choice(_K_SYL) for _ in range(rng.choice((2, 3)))) + rng.choice(_K_SUF))
        if {country, capital, language} & used:
            misses += 1
            continue
        misses = 0
        used |= {country, capital, language}
        yield country, capital, language


_WORLD: list[tuple[str, str, str]] = []
_WORLD_ITER = _synthetic_world()


def _world(i: int) -> tuple[str, str, str] | None:
    while len(_WORLD) <= i:
        nxt = next(_WORLD_ITER, None)
        if nxt is None:
            return None
        _WORLD.append(nxt)
    return _WORLD[i]


# ----------------------------------------------------------------------------- topics
# Each topic generator yields (question, answer-as-used-in-a-sentence, [2nd sentences], [3rd sentences]).

def _geo(rng, table, col, questions):
    """Real table rows first, then fictional countries (shared by both geography topics)."""
    for i in range(MAX_PROMPTS + len(table)):
        w = table[i] if i < len(table) else _world(i - len(table))
        if w is None:
            return
        yield rng.choice(questions).format(c=w[0]), w[0], w[1] if i < len(table) else w[col]


def _t_capital(rng):
    for q, c, k in _geo(rng, _shuf(rng, _CAPITALS), 1, ("What is the capital of {c}?",
                                                         "Which city is the capital of {c}?")):
        yield q, k, [f"{k} is the capital city of {c}, where the national government meets and makes its laws.",
                     f"The government of {c} works in {k}, which is the capital city of the whole country."], \
            [f"Many people who travel to {c} visit {k} to see its famous streets and old buildings.",
             f"If you look at a map of {c}, you will find {k} marked as its capital."]


def _t_language(rng):
    for q, c, lang in _geo(rng, _shuf(rng, _LANGUAGES), 2, ("What language do people speak in {c}?",
                                                             "What is the main language of {c}?")):
        yield q, lang, [f"Most people in {c} speak {lang} at home, at school and at work every day.",
                        f"{lang} is the main language that people use in {c} for talking and writing."], \
            [f"Children in {c} learn to read and write in {lang} when they are young.",
             f"If you visit {c}, it helps to know a few simple words of {lang}."]


def _t_people(rng):
    for verb, thing, who in _shuf(rng, _PEOPLE):
        yield f"Who {verb} {thing}?", who, \
            [f"{who} {verb} {thing}, and this is why the name {who} is still famous today.",
             f"It was {who} who {verb} {thing}, a moment that is still remembered."], \
            [f"Many books and teachers tell the story of how {who} {verb} {thing}.",
             f"People still learn about {who} in school for this reason."]


def _t_colour(rng):
    for thing, col in _shuf(rng, _COLOURS):
        yield f"What colour is {thing}?", col, \
            [f"{_cap(thing)} is {col}, and this colour is easy to see when you look at it closely.",
             f"The usual colour of {thing} is {col}, as you can see for yourself."], \
            [f"If you ask most people what colour {thing} is, they will tell you that it is {col}.",
             f"Painters use {col} paint when they make a picture of {thing}."]


def _t_definition(rng):
    for term, d in _shuf(rng, _DEFINITIONS):
        word = term.split(" ", 1)[1]
        yield f"What is {term}?", d, \
            [f"In simple words, {term} is {d}, and this is how most people would describe it.",
             f"People use the word {word} to mean {d}, and that is its usual meaning."], \
            [f"You will often see the word {word} used with this meaning in books and at school.",
             f"A good dictionary will give you the same meaning for the word {word}."]


def _t_list(rng):
    for what, ans in _shuf(rng, _LISTS):
        yield f"Name {what}.", ans, \
            [f"When people are asked to name {what}, most of them give the same short list.",
             "This is a short list that is the same in most books and lessons."], \
            [f"It is easy to remember that {what} are {ans}, and many children learn this at school.",
             f"So if someone asks you this question, you can simply say {ans}."]


def _t_opposite(rng):
    for w, o in _shuf(rng, [(a, b) for a, b in _OPPOSITES] + [(b, a) for a, b in _OPPOSITES]):
        yield f"What is the opposite of {w}?", o, \
            [f"The word {o} means the reverse of {w}, so the two words are opposites.",
             f"The words {w} and {o} have opposite meanings, so each is the opposite of the other."], \
            [f"For example, {w} and {o} are often taught together as a pair of words with opposite meanings.",
             f"Many simple word games ask children to match {w} with {o}."]


def _t_sound(rng):
    for animal, s in _shuf(rng, _SOUNDS):
        yield f"What sound does {animal} make?", s, \
            [f"{_cap(animal)} makes a sound like {s}, and you can often hear it on a farm or out in the wild.",
             f"The sound that {animal} makes is usually written as {s} in books."], \
            [f"Children like to copy the {s} of {animal} when they play games about animals.",
             f"If you listen carefully to {animal}, you will hear it say {s} again and again."]


def _t_baby(rng):
    for animal, baby in _shuf(rng, _BABIES):
        b, an = baby.split(" ", 1)[1], "an" if animal[0] in "aeiou" else "a"
        yield f"What is a baby {animal} called?", baby, \
            [f"A young {animal} is called {baby} until it grows up into an adult {animal}.",
             f"When {an} {animal} is born, it is known as {baby} for its first months of life."], \
            [f"Farmers and people who study animals use the word {b} when they talk about a young {animal}.",
             f"So if you see {baby}, you know that it will grow up into {an} {animal}."]


def _t_arithmetic(rng):
    rows = [("plus", a, b) for a in range(1, 31) for b in range(1, 31)]
    rows += [("minus", a, b) for a in range(1, 31) for b in range(1, a + 1)]
    rows += [("times", a, b) for a in range(1, 13) for b in range(1, 13)]
    rng.shuffle(rows)
    for op, a, b in rows:
        if op == "plus":
            c = a + b
            s2 = [f"When you add {a} and {b} together, you get a total of {c}.", f"Adding {b} to {a} gives {c}."]
            s3 = [f"You can check this by starting at {a} and counting up {b} more steps until you reach {c}.",
                  f"You can also check it the other way, because {c} minus {b} is {a} again."]
        elif op == "minus":
            c = a - b
            s2 = [f"When you take {b} away from {a}, you are left with {c}.", f"Taking {b} from {a} leaves {c}."]
            s3 = [f"You can check this by starting at {a} and counting down {b} steps until you reach {c}.",
                  f"You can also check it the other way, because {c} plus {b} is {a} again."]
        else:
            c = a * b
            s2 = [f"When you multiply {a} by {b}, you get a result of {c}.", f"{a} groups of {b} make {c}."]
            s3 = [f"This is the same as adding together {b} groups of {a}, which also gives a total of {c}.",
                  f"You can check it by adding {a} to itself {b} times, which gives {c} in the end."]
        yield f"What is {a} {op} {b}?", str(c), s2, s3


def _t_compare(rng):
    seen: set[tuple[str, int, int]] = set()
    while len(seen) < 15000:  # of 2*99*98 possible; sampled lazily (building them all is slow)
        w, a, b = rng.choice(("larger", "smaller")), rng.randint(1, 99), rng.randint(1, 99)
        if a == b or (w, a, b) in seen:
            continue
        seen.add((w, a, b))
        m, n = (max(a, b), min(a, b)) if w == "larger" else (min(a, b), max(a, b))
        rel = "after" if w == "larger" else "before"
        big = "bigger" if w == "larger" else "smaller"
        yield f"Which number is {w}, {a} or {b}?", str(m), \
            [f"The number {m} is {w} than {n}, because {m} comes {rel} {n} when you count up from one.",
             f"If you count up from one, you reach {m} {rel} {n}, so {m} is {w}."], \
            [f"So if you compare {a} and {b}, the {big} number of the two is {m}.",
             f"Putting {a} and {b} on a number line shows the same thing, and {m} is {w}."]


def _t_counting(rng):
    for n in _shuf(rng, range(0, 200)):
        ans = f"{n + 1}, {n + 2} and {n + 3}"
        yield f"Which three numbers come after {n}?", ans, \
            [f"If you start at {n} and count up by one each time, the next three numbers are {ans}.",
             f"Counting up from {n}, you say {ans} in that order."], \
            [f"Counting like this is one of the first things that children learn to do with numbers.",
             f"Each of these numbers is one more than the number that comes just before it."]


def _t_next(rng):
    for w, n in _shuf(rng, [(w, n) for w in ("after", "before") for n in range(1, 200)]):
        m, step, way = (n + 1, "one more", "up") if w == "after" else (n - 1, "one less", "down")
        yield f"What number comes {w} {n}?", str(m), \
            [f"The number {m} comes just {w} {n}, because {m} is {step} than {n}.",
             f"When you count {way} from {n}, the very next number that you say is {m}."], \
            [f"You can see this on a number line, where {m} sits right next to {n}.",
             f"So the number that comes {w} {n} is {m}, and it is easy to check by counting."]


def _t_double(rng):
    for w, n in _shuf(rng, [("double", n) for n in range(1, 101)] + [("half", n) for n in range(2, 201, 2)]):
        if w == "double":
            m = 2 * n
            yield f"What is double {n}?", str(m), \
                [f"To double a number you add it to itself, so {n} plus {n} gives {m}.",
                 f"Double {n} means two lots of {n}, which makes {m}."], \
                [f"You can also say that 2 times {n} is {m}, which is the same thing.",
                 f"Half of {m} is {n} again, so the answer is easy to check."]
        else:
            m = n // 2
            yield f"What is half of {n}?", str(m), \
                [f"To find half of a number you split it into two equal parts, so half of {n} is {m}.",
                 f"Half of {n} means one of two equal parts of {n}, which is {m}."], \
                [f"You can check it because {m} plus {m} makes {n} again.",
                 f"Double {m} is {n}, so the answer is easy to check."]


def _t_legs(rng):
    for s, p, legs, k in _shuf(rng, [(s, p, int(legs), k) for s, p, legs in _LEGS for k in range(2, 10)]):
        t = k * legs
        yield f"How many legs do {k} {p} have?", str(t), \
            [f"Each {s} has {legs} legs, so {k} {p} have {k} times {legs} legs, which is {t} legs in total.",
             f"One {s} has {legs} legs, and {k} times {legs} makes {t}."], \
            [f"If you count every leg on all {k} {p} one by one, you will also reach {t}.",
             f"You can check this by adding {legs} legs for each of the {k} {p}."]


# Round-robin slots; topics sharing a slot take turns (keeps synthetic names a minority).
_SLOTS = ((("capital", _t_capital), ("language", _t_language)), (("people", _t_people),),
          (("colour", _t_colour),), (("definition", _t_definition),), (("list", _t_list),),
          (("opposite", _t_opposite),), (("animal_sound", _t_sound), ("baby_animal", _t_baby)),
          (("arithmetic", _t_arithmetic),), (("comparison", _t_compare),),
          (("counting", _t_counting), ("next_number", _t_next)), (("doubling", _t_double),),
          (("legs", _t_legs),))


# ----------------------------------------------------------------------------- pool
def _make(topic: str, rng: random.Random, q: str, a: str, s2s: list[str], s3s: list[str]) -> dict:
    concise = _cap(a) + "."
    n = len(concise.split())
    if not (CONCISE_WORDS[0] <= n <= CONCISE_WORDS[1]) or concise.split()[0] in VERBOSE_FIRST_WORDS:
        raise AssertionError(f"bad concise answer {concise!r} for {q!r}")
    opener = rng.choice(VERBOSE_OPENERS).format(a=a)
    combos = [(x, y) for x in s2s for y in s3s]
    rng.shuffle(combos)
    for x, y in combos:
        verbose = f"{opener} {_cap(x)} {_cap(y)}"
        if VERBOSE_WORDS[0] <= len(verbose.split()) <= VERBOSE_WORDS[1]:
            return {"prompt": q, "concise": concise, "verbose": verbose, "topic": topic}
    raise AssertionError(f"no verbose template of {VERBOSE_WORDS} words fits {q!r}")


def _iter_pool() -> Iterator[dict]:
    """Round-robin over slots (fixed order, fixed per-topic RNGs), deduplicating prompts."""
    slots = [[(n, random.Random(_seed(n)), fn(random.Random(_seed(n + "/items")))) for n, fn in slot]
             for slot in _SLOTS]
    seen: set[str] = set()
    while slots:
        for slot in slots:
            while slot:
                name, rng, it = slot.pop(0)
                item = next((x for x in it if x[0] not in seen), None)
                if item is not None:
                    slot.append((name, rng, it))
                    seen.add(item[0])
                    yield _make(name, rng, *item)
                    break
        slots = [s for s in slots if s]


_POOL: list[dict] = []
_POOL_ITER = _iter_pool()


def _extend_pool(n: int) -> None:
    while len(_POOL) < min(n, MAX_PROMPTS):
        nxt = next(_POOL_ITER, None)
        if nxt is None:
            break
        _POOL.append(nxt)


def _sample(num_prompts: int, seed: int) -> tuple[list[dict], list[str]]:
    if not 1 <= num_prompts <= MAX_PROMPTS:
        raise ValueError(f"num_prompts must be in [1, {MAX_PROMPTS}], got {num_prompts}")
    _extend_pool(num_prompts)
    if len(_POOL) < num_prompts:
        raise ValueError(f"only {len(_POOL)} distinct prompts available")
    rng = random.Random(int(seed))
    order = list(range(num_prompts))
    rng.shuffle(order)
    styles = ["concise" if rng.random() < 0.5 else "verbose" for _ in order]
    return [dict(_POOL[i]) for i in order], styles


# ----------------------------------------------------------------------------- API
def generate_pairs(num_prompts: int = 2000, seed: int = 0) -> list[dict]:
    """``[{"prompt", "concise", "verbose", "topic"}]`` for every prompt, in the same order as
    :func:`generate_rows` with the same arguments."""
    return _sample(num_prompts, seed)[0]


def generate_rows(num_prompts: int = 2000, seed: int = 0) -> list[dict]:
    """Chat rows, one per prompt, each with one answer style drawn with p=0.5 by a seeded RNG:
    ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "style", "topic"}``."""
    pairs, styles = _sample(num_prompts, seed)
    return [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": p[s]}],
             "style": s, "topic": p["topic"]} for p, s in zip(pairs, styles)]


def corpus_text(rows: Iterable[dict]) -> Iterator[str]:
    """Yield every text for tokenizer training: the question and BOTH answers of each row.

    Accepts chat rows (from :func:`generate_rows`; the answer in the other style is looked up
    in the deterministic prompt pool) or pair dicts (from :func:`generate_pairs`).
    """
    rows = list(rows)
    wanted = {r["messages"][0]["content"] for r in rows if "messages" in r}
    index = {p["prompt"]: p for p in _POOL}
    while wanted - index.keys() and len(_POOL) < MAX_PROMPTS:
        start = len(_POOL)
        _extend_pool(start + 1000)
        if len(_POOL) == start:
            break
        index.update((p["prompt"], p) for p in _POOL[start:])
    for r in rows:
        if "messages" not in r:
            yield r["prompt"]
            yield r["concise"]
            yield r["verbose"]
            continue
        for m in r["messages"]:
            yield m["content"]
        pair = index.get(r["messages"][0]["content"])
        if pair is not None:
            other = "verbose" if r.get("style") == "concise" else "concise"
            yield pair[other]
