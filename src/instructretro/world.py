"""The embedded default data: a seeded synthetic factual world.

The world has entities (cities, people, organisations) with invented names and facts. From it
we write:

- ``reference.jsonl``: one dense, encyclopedia-style entry per entity. It is the default
  retrieval-database corpus and never part of the pretraining text: as in RETRO, the database
  holds knowledge the model did not train on.
- ``documents.jsonl``: the pretraining corpus. Several documents per entity in different
  styles (news, travel, profile, report, forum, history). The entity is named early; its facts
  are spread over later paragraphs in varied phrasing; each document states only a subset of
  the facts, so each fact appears in only a few documents. Some documents quote the reference
  verbatim, some share a syndicated wire item verbatim, all carry style boilerplate, and
  round-up documents mention entities only in passing. Records carry ``entity``, ``style``,
  ``facts`` ([attribute, value] pairs) and ``fact_spans`` (character spans of the fact values).
- ``qa.jsonl``: NQ-open questions about held-out entities (none of them in the SFT data),
  answered by the reference entries.
- ``sft/*.jsonl``: an instruction-tuning blend shaped like InstructRetro's: one large
  conversational source and several small ones.
- ``facts.jsonl``: every fact, for tests and analysis.

Everything is a pure function of the params; the same seed gives byte-identical files.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError
from .io import atomic_path, write_jsonl

SYSTEM_PROMPT = (
    "This is a chat between a user and an artificial intelligence assistant. "
    "The assistant gives helpful, short and factual answers to the user's questions, "
    "using the context when it is given."
)

ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w",
          "z", "br", "dr", "gr", "kr", "st", "th", "tr", "sh", "ch", "fl", "pl", "sk", "vr"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "y"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "st", "v"]

OCCUPATIONS = ["architect", "violinist", "chemist", "cartographer", "sculptor", "astronomer", "surgeon",
               "novelist", "engineer", "botanist", "historian", "photographer", "economist", "linguist",
               "geologist", "painter", "composer", "mathematician", "journalist", "diplomat"]
INDUSTRIES = ["shipping", "textiles", "software", "brewing", "mining", "publishing", "aviation",
              "pharmaceuticals", "banking", "glassmaking", "robotics", "agriculture", "insurance",
              "railways", "telecommunications", "furniture", "cosmetics", "shipbuilding"]
LANDMARK_KINDS = ["Bridge", "Tower", "Gardens", "Cathedral", "Lighthouse", "Market Hall", "Observatory",
                  "Fortress", "Library", "Opera House"]
AWARD_KINDS = ["Medal", "Prize", "Award", "Fellowship"]
HOBBIES = ["sailing", "chess", "beekeeping", "rock climbing", "gardening", "birdwatching", "fencing",
           "pottery", "cycling", "calligraphy", "fishing", "juggling"]
PRODUCT_KINDS = ["engine", "lamp", "reader", "scanner", "tractor", "camera", "radio", "valve"]

# attribute -> (reference sentence, [document phrasings], [(question, answer-form)])
# {e} is the entity, {v} the fact value (recorded as a fact span).
ATTRIBUTES = {
    "city": {
        "country": ("{e} is a city in {v}.",
                    ["{e} lies in {v}.", "{e} is one of the oldest cities of {v}.",
                     "Travellers reach {e} from every corner of {v}.", "As a city of {v}, {e} keeps many old customs."],
                    ["Which country is {e} in?", "In what country is the city of {e}?"]),
        "founded": ("It was founded in {v}.",
                    ["{e} was founded in {v}.", "Records show that {e} was established in {v}.",
                     "The history of {e} goes back to {v}, the year it was founded.",
                     "Since its founding in {v}, {e} has grown steadily."],
                    ["When was {e} founded?", "In which year was the city of {e} founded?"]),
        "population": ("Its population is {v}.",
                       ["Today {e} is home to {v} people.", "The population of {e} stands at {v}.",
                        "Some {v} residents live in {e}.", "At the last count, {e} had {v} inhabitants."],
                       ["What is the population of {e}?", "How many people live in {e}?"]),
        "river": ("The {v} flows through the city.",
                  ["The {v} runs through the middle of {e}.", "{e} was built on the banks of the {v}.",
                   "Boats still carry goods along the {v} past {e}."],
                  ["Which river flows through {e}?", "What river runs through the city of {e}?"]),
        "mayor": ("The mayor of {e} is {v}.",
                  ["The current mayor of {e} is {v}.", "{e} is governed by its mayor, {v}.",
                   "Mayor {v} has led {e} for several years."],
                  ["Who is the mayor of {e}?", "Who governs the city of {e} as mayor?"]),
        "landmark": ("Its best known landmark is the {v}.",
                     ["The most famous sight in {e} is the {v}.", "No visit to {e} is complete without the {v}.",
                      "Postcards from {e} usually show the {v}."],
                     ["What is the best known landmark of {e}?", "Which famous landmark stands in {e}?"]),
        "area": ("It covers {v} square kilometres.",
                 ["{e} covers an area of {v} square kilometres.", "The city limits of {e} enclose {v} square kilometres.",
                  "With {v} square kilometres of land, {e} is easy to explore."],
                 ["How large is the area of {e} in square kilometres?", "What area does {e} cover in square kilometres?"]),
        "university": ("The city is home to the {v}.",
                       ["Students come to {e} to study at the {v}.", "The {v} is the pride of {e}.",
                        "The largest school in {e} is the {v}."],
                       ["Which university is in {e}?", "What is the name of the university in {e}?"]),
        "festival": ("Every summer {e} holds the {v}.",
                     ["Each summer the {v} fills the streets of {e}.", "Crowds gather in {e} for the {v}.",
                      "The {v} is the biggest event of the year in {e}."],
                     ["Which festival is held in {e} every summer?", "What festival takes place in {e}?"]),
    },
    "person": {
        "born": ("{e} was born in {v}.",
                 ["{e} was born in the year {v}.", "Born in {v}, {e} showed talent early.",
                  "{e}, who was born in {v}, grew up in a large family."],
                 ["In what year was {e} born?", "When was {e} born?"]),
        "birthplace": ("{e} was born in the city of {v}.",
                       ["{e} grew up in {v}.", "{e} is a native of {v}.", "The city of {v} is where {e} was born."],
                       ["Where was {e} born?", "In which city was {e} born?"]),
        "occupation": ("{e} works as {a} {v}.",
                       ["By profession, {e} is {a} {v}.", "{e} made a name as {a} {v}.",
                        "Colleagues describe {e} as a gifted {v}."],
                       ["What is the profession of {e}?", "What does {e} work as?"]),
        "employer": ("{e} works for {v}.",
                     ["{e} is employed by {v}.", "For years {e} has worked at {v}.",
                      "{e} joined {v} and stayed there."],
                     ["Which organisation does {e} work for?", "Who is the employer of {e}?"]),
        "award": ("{e} received the {v}.",
                  ["{e} was honoured with the {v}.", "The {v} went to {e}.", "{e} is a winner of the {v}."],
                  ["Which award did {e} receive?", "What honour was given to {e}?"]),
        "spouse": ("{e} is married to {v}.",
                   ["{e} and {v} have been married for years.", "The spouse of {e} is {v}.",
                    "{e} lives with {v}, whom {e} married young."],
                   ["Who is {e} married to?", "Who is the spouse of {e}?"]),
        "book": ("{e} wrote the book {v}.",
                 ["{e} is the author of {v}.", "The book {v} was written by {e}.",
                  "Many readers know {e} from the book {v}."],
                 ["Which book did {e} write?", "What is the title of the book written by {e}?"]),
        "mentor": ("{e} studied under {v}.",
                   ["{e} learned the trade from {v}.", "Early on, {v} was the mentor of {e}.",
                    "{e} credits {v} as a teacher."],
                   ["Who was the mentor of {e}?", "Under whom did {e} study?"]),
        "hobby": ("In free time {e} enjoys {v}.",
                  ["Away from work, {e} loves {v}.", "{e} spends weekends on {v}.", "A keen hobby of {e} is {v}."],
                  ["What hobby does {e} enjoy?", "What does {e} do in free time?"]),
    },
    "org": {
        "founded": ("{e} was founded in {v}.",
                    ["{e} was set up in {v}.", "Since {v}, {e} has been in business.",
                     "The company {e} dates from {v}."],
                    ["When was {e} founded?", "In which year was the company {e} founded?"]),
        "headquarters": ("Its headquarters are in {v}.",
                         ["{e} is headquartered in {v}.", "The head office of {e} stands in {v}.",
                          "From its base in {v}, {e} runs its business."],
                         ["Where is {e} headquartered?", "In which city are the headquarters of {e}?"]),
        "founder": ("It was founded by {v}.",
                    ["{e} was started by {v}.", "The founder of {e} is {v}.", "{v} founded {e}."],
                    ["Who founded {e}?", "Who is the founder of {e}?"]),
        "industry": ("It works in {v}.",
                     ["{e} is active in {v}.", "{e} is a leading name in {v}.", "The main business of {e} is {v}."],
                     ["What industry is {e} in?", "In which industry does {e} work?"]),
        "employees": ("It has {v} employees.",
                      ["{e} employs {v} people.", "The staff of {e} numbers {v}.", "Some {v} people work for {e}."],
                      ["How many employees does {e} have?", "How many people work for {e}?"]),
        "product": ("Its best known product is the {v}.",
                    ["{e} is famous for the {v}.", "The {v} made {e} known far and wide.",
                     "Everyone associates {e} with the {v}."],
                    ["What is the best known product of {e}?", "Which product is {e} famous for?"]),
        "ceo": ("Its chief executive is {v}.",
                ["{e} is run by its chief executive, {v}.", "The chief executive of {e} is {v}.",
                 "{v} leads {e} as chief executive."],
                ["Who is the chief executive of {e}?", "Who runs {e} as chief executive?"]),
        "revenue": ("Its yearly revenue is {v} million crowns.",
                    ["{e} earns {v} million crowns a year.", "The yearly revenue of {e} is {v} million crowns.",
                     "Last year {e} took in {v} million crowns."],
                    ["What is the yearly revenue of {e} in millions of crowns?", "How much does {e} earn a year, in millions of crowns?"]),
        "rival": ("Its main rival is {v}.",
                  ["{e} competes most closely with {v}.", "The main rival of {e} is {v}.",
                   "For decades {e} and {v} have been rivals."],
                  ["Who is the main rival of {e}?", "Which company is the main rival of {e}?"]),
    },
}

KIND_NOUN = {"city": "city", "person": "person", "org": "company"}

STYLES = {
    "news": {
        "title": "{e} in the news",
        "open": ["{e} made headlines again this week.", "Reporters returned to {e} this month."],
        "filler": ["Officials in {e} declined to comment further.", "The story of {e} drew wide attention.",
                   "Readers have sent many letters about {e}."],
        "footer": "This report was distributed by the Continental Wire Service. Reproduction is permitted with attribution.",
    },
    "travel": {
        "title": "A traveller's notes on {e}",
        "open": ["I finally visited {e} last spring.", "Few places surprised me as much as {e}."],
        "filler": ["The food in {e} deserves its reputation.", "Evenings in {e} are calm and pleasant.",
                   "Getting around {e} on foot is easy."],
        "footer": "All opinions are the author's own. Prices and opening hours may change without notice.",
    },
    "profile": {
        "title": "Profile: {e}",
        "open": ["This profile looks at {e}.", "Much has been written about {e}, but little of it is complete."],
        "filler": ["Friends say {e} rarely takes a day off.", "Those who know {e} speak of great patience.",
                   "{e} prefers to avoid interviews."],
        "footer": "Profiles in this series are compiled from public records and interviews.",
    },
    "report": {
        "title": "Annual overview: {e}",
        "open": ["This overview summarises the year for {e}.", "Analysts followed {e} closely this year."],
        "filler": ["Observers expect {e} to stay busy.", "The outlook for {e} remains steady.",
                   "Investors keep a close eye on {e}."],
        "footer": "This overview is provided for information only and is not investment advice.",
    },
    "forum": {
        "title": "Forum thread: what do you know about {e}?",
        "open": ["Does anyone here know much about {e}?", "Quick question about {e} for the regulars."],
        "filler": ["Thanks in advance, everyone, this helps a lot with {e}.", "I read a lot about {e} last night.",
                   "Correct me if I am wrong about {e}."],
        "footer": "Posts reflect the views of their authors. Please follow the community guidelines.",
    },
    "history": {
        "title": "A short history of {e}",
        "open": ["The history of {e} is worth telling.", "Historians return to {e} again and again."],
        "filler": ["Much about the early days of {e} is still debated.", "Old letters mention {e} often.",
                   "The archives on {e} are large."],
        "footer": "Sources for this history are listed in the archive catalogue.",
    },
}

GAZETTEER = "The Gazetteer of the Realms says: \""
WIRE = "WIRE: "


@dataclass
class Entity:
    name: str
    kind: str
    facts: dict = field(default_factory=dict)  # attribute -> value (str)


@dataclass
class World:
    entities: list
    qa_entities: set  # names held out of the SFT data


class _Names:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(n))
            w = (w + self.rng.choice(CODAS)).capitalize()
            if w not in self.used and 4 <= len(w) <= 12:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.word((1, 2))} {self.word((2, 3))}"


def build_world(num_entities: int, seed: int) -> World:
    """Entities with facts. Facts that name other entities refer to real entities of the world."""
    if num_entities < 6:
        raise PipelineError(f"params.yaml: world.num_entities must be >= 6, got {num_entities}")
    rng = random.Random(seed)
    names = _Names(rng)
    countries = [names.word((2, 3)) for _ in range(max(4, num_entities // 40))]
    kinds = ["city", "person", "org"]
    ents = [Entity(names.word() if kinds[i % 3] != "person" else names.person(), kinds[i % 3])
            for i in range(num_entities)]
    by_kind = {k: [e for e in ents if e.kind == k] for k in kinds}
    for e in ents:
        f = e.facts
        if e.kind == "city":
            f["country"] = rng.choice(countries)
            f["founded"] = str(rng.randint(1100, 1950))
            f["population"] = str(rng.randint(5_000, 2_000_000))
            f["river"] = f"{names.word((2, 2))} River"
            f["mayor"] = names.person()
            f["landmark"] = f"{names.word((2, 2))} {rng.choice(LANDMARK_KINDS)}"
            f["area"] = str(rng.randint(12, 3_000))
            f["university"] = f"University of {names.word((2, 2))}"
            f["festival"] = f"{names.word((2, 2))} Festival"
        elif e.kind == "person":
            f["born"] = str(rng.randint(1900, 2000))
            f["birthplace"] = rng.choice(by_kind["city"]).name
            f["occupation"] = rng.choice(OCCUPATIONS)
            f["employer"] = rng.choice(by_kind["org"]).name
            f["award"] = f"{names.word((2, 2))} {rng.choice(AWARD_KINDS)}"
            f["spouse"] = names.person()
            f["book"] = f"The {names.word((2, 2))} {rng.choice(['Letters', 'Road', 'Garden', 'Winter', 'Harbour', 'Lantern'])}"
            f["mentor"] = rng.choice(by_kind["person"]).name
            f["hobby"] = rng.choice(HOBBIES)
        else:
            f["founded"] = str(rng.randint(1800, 2015))
            f["headquarters"] = rng.choice(by_kind["city"]).name
            f["founder"] = rng.choice(by_kind["person"]).name
            f["industry"] = rng.choice(INDUSTRIES)
            f["employees"] = str(rng.randint(20, 90_000))
            f["product"] = f"{names.word((2, 2))} {rng.choice(PRODUCT_KINDS)}"
            f["ceo"] = names.person()
            f["revenue"] = str(rng.randint(2, 9_000))
            f["rival"] = rng.choice(by_kind["org"]).name
    held = rng.sample(range(num_entities), max(1, num_entities // 5))
    return World(ents, {ents[i].name for i in held})


class _Text:
    """Builds a text piece by piece and records the character spans of fact values."""

    def __init__(self):
        self.parts: list[str] = []
        self.len = 0
        self.spans: list[list[int]] = []

    def add(self, s: str) -> None:
        self.parts.append(s)
        self.len += len(s)

    def sentence(self, template: str, e: str, v: str | None = None) -> None:
        for piece in re.split(r"(\{[eva]\})", template):
            if piece == "{e}":
                self.add(e)
            elif piece == "{a}":
                self.add(article(v))
            elif piece == "{v}":
                self.spans.append([self.len, self.len + len(v)])
                self.add(v)
            else:
                self.add(piece)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def reference_entry(e: Entity) -> _Text:
    t = _Text()
    t.add(f"{e.name}\n")
    t.add(f"{e.name} is a {KIND_NOUN[e.kind]}. ")
    for attr, (ref, _, _) in ATTRIBUTES[e.kind].items():
        t.sentence(ref, e.name, e.facts[attr])
        t.add(" ")
    return t


def _styles_for(kind: str) -> list[str]:
    if kind == "city":
        return ["travel", "news", "history", "forum"]
    if kind == "person":
        return ["profile", "news", "forum", "history"]
    return ["report", "news", "forum", "history"]


def documents(world: World, docs_per_entity: int, seed: int) -> list[dict]:
    """Pretraining documents (see module docstring). Each fact goes into about half of an
    entity's documents; wire items are shared verbatim by two documents of one entity."""
    rng = random.Random(seed + 1)
    out = []
    all_names = [e.name for e in world.entities]
    for e in world.entities:
        attrs = list(ATTRIBUTES[e.kind])
        styles = _styles_for(e.kind)
        wire = None
        if docs_per_entity >= 2 and rng.random() < 0.35:
            wattrs = rng.sample(attrs, 2)
            wire = (wattrs, [rng.choice(ATTRIBUTES[e.kind][a][1]) for a in wattrs])
            wire_docs = set(rng.sample(range(docs_per_entity), 2))
        # every fact is stated by at least one document, most by about half of them
        subsets = [set() for _ in range(docs_per_entity)]
        for a in attrs:
            k = max(1, round(docs_per_entity * rng.uniform(0.4, 0.75)))
            for d in rng.sample(range(docs_per_entity), k):
                subsets[d].add(a)
        for d in range(docs_per_entity):
            style = styles[(d + rng.randrange(len(styles))) % len(styles)]
            st = STYLES[style]
            t = _Text()
            t.sentence(st["title"] + "\n\n", e.name)
            t.sentence(rng.choice(st["open"]) + " ", e.name)
            t.add(f"{e.name} is a {KIND_NOUN[e.kind]} that many people ask about.\n\n")
            fillers = rng.sample(st["filler"], len(st["filler"]))
            stated = []
            chosen = [a for a in attrs if a in subsets[d]]
            rng.shuffle(chosen)
            i = 0
            while chosen:
                a = chosen.pop(0)
                if i and i % 2 == 0:
                    t.add("\n\n")
                i += 1
                if rng.random() < 0.45:
                    # a verbatim quote of the reference entry: this fact's sentence and up to two
                    # following ones (reference order) that this document states too
                    run = [a]
                    for b in attrs[attrs.index(a) + 1 :]:
                        if b not in chosen or len(run) == 3 or rng.random() < 0.4:
                            break
                        run.append(b)
                        chosen.remove(b)
                    t.add(GAZETTEER)
                    for k, b in enumerate(run):
                        t.sentence(("" if k == 0 else " ") + ATTRIBUTES[e.kind][b][0], e.name, e.facts[b])
                        stated.append([b, e.facts[b]])
                    t.add("\" ")
                else:
                    t.sentence(rng.choice(ATTRIBUTES[e.kind][a][1]) + " ", e.name, e.facts[a])
                    stated.append([a, e.facts[a]])
                if fillers and rng.random() < 0.3:
                    t.sentence(fillers.pop() + " ", e.name)
                if rng.random() < 0.1:
                    other = rng.choice(all_names)
                    if other != e.name:
                        t.add(f"Some readers also asked about {other}. ")
            if wire is not None and d in wire_docs:
                t.add("\n\n" + WIRE)
                for a, phrase in zip(*wire):
                    t.sentence(phrase + " ", e.name, e.facts[a])
                    if [a, e.facts[a]] not in stated:
                        stated.append([a, e.facts[a]])
            t.add("\n\n" + st["footer"] + "\n")
            out.append({"text": t.text, "entity": e.name, "style": style, "facts": stated,
                        "fact_spans": t.spans})
    # round-ups: entities mentioned only in passing, no facts
    for r in range(max(1, len(world.entities) // 10)):
        picks = rng.sample(world.entities, min(4, len(world.entities)))
        t = _Text()
        t.add("Weekly round-up\n\nThis week our readers wrote about several places, people and companies. ")
        for p in picks:
            t.add(f"One letter mentioned {p.name} in passing. ")
        t.add("\n\nThank you for writing in. The round-up returns next week.")
        out.append({"text": t.text, "entity": "", "style": "roundup", "facts": [], "fact_spans": []})
    return out


def _answers(v: str) -> list[str]:
    golds = [v]
    if v.endswith(" River"):
        golds.append(v[: -len(" River")])
    return golds


def qa_set(world: World, n: int, seed: int) -> list[dict]:
    """NQ-open questions about the held-out entities, each answered by a reference entry."""
    rng = random.Random(seed + 2)
    held = [e for e in world.entities if e.name in world.qa_entities]
    pool = [(e, a) for e in held for a in ATTRIBUTES[e.kind]]
    rng.shuffle(pool)
    out = []
    for e, a in pool[:n]:
        q = rng.choice(ATTRIBUTES[e.kind][a][2]).format(e=e.name)
        out.append({"question": q, "answer": _answers(e.facts[a]), "entity": e.name, "attribute": a})
    return out


def _fact_sentence(e: Entity, a: str, rng: random.Random) -> str:
    phrase = rng.choice(ATTRIBUTES[e.kind][a][1])
    return phrase.format(e=e.name, v=e.facts[a], a=article(e.facts[a]))


def sft_sets(world: World, n_conversations: int, seed: int) -> dict[str, list[dict]]:
    """Instruction data from the entities that are not held out for QA."""
    rng = random.Random(seed + 3)
    ents = [e for e in world.entities if e.name not in world.qa_entities]
    chat, short_qa, alpaca, summaries = [], [], [], []
    for _ in range(n_conversations):
        e = rng.choice(ents)
        msgs = []
        for a in rng.sample(list(ATTRIBUTES[e.kind]), rng.randint(1, 3)):
            q = rng.choice(ATTRIBUTES[e.kind][a][2]).format(e=e.name)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _fact_sentence(e, a, rng)}]
        chat.append({"system": SYSTEM_PROMPT, "messages": msgs})
    for _ in range(max(20, n_conversations // 5)):
        e = rng.choice(ents)
        a = rng.choice(list(ATTRIBUTES[e.kind]))
        q = rng.choice(ATTRIBUTES[e.kind][a][2]).format(e=e.name)
        short_qa.append({"system": SYSTEM_PROMPT, "messages": [
            {"role": "user", "content": f"Answer the following question with a short span. {q}"},
            {"role": "assistant", "content": f"The answer is {e.facts[a]}"}]})
    for _ in range(max(20, n_conversations // 10)):
        kind = rng.randrange(4)
        if kind == 0:
            w = rng.choice(ents).name.split()[0]
            alpaca.append({"instruction": "Reverse the letters of this word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            xs = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
            alpaca.append({"instruction": "Sort these numbers from smallest to largest.",
                           "input": " ".join(map(str, xs)), "output": " ".join(map(str, sorted(xs)))})
        elif kind == 2:
            x, y = rng.randint(1, 500), rng.randint(1, 500)
            alpaca.append({"instruction": f"What is {x} plus {y}?", "input": "", "output": str(x + y)})
        else:
            e = rng.choice(ents)
            alpaca.append({"instruction": f"Is {e.name} a city, a person or a company?", "input": "",
                           "output": f"{e.name} is a {KIND_NOUN[e.kind]}."})
    for _ in range(max(20, n_conversations // 10)):
        e = rng.choice(ents)
        entry = reference_entry(e).text
        a = rng.choice(list(ATTRIBUTES[e.kind]))
        summaries.append({"system": SYSTEM_PROMPT, "messages": [
            {"role": "user", "content": f"Summarise this passage in one sentence.\n\n{entry.strip()}"},
            {"role": "assistant", "content": f"{e.name} is a {KIND_NOUN[e.kind]}; {_fact_sentence(e, a, rng)}"}]})
    return {"chat": chat, "short_qa": short_qa, "alpaca": alpaca, "summaries": summaries}


def write_world(out: str | Path, num_entities: int, docs_per_entity: int, qa_questions: int,
                sft_conversations: int, seed: int) -> dict:
    """Write every file of the default data set into ``out`` (atomically); return counts."""
    if docs_per_entity < 1:
        raise PipelineError(f"params.yaml: world.docs_per_entity must be >= 1, got {docs_per_entity}")
    world = build_world(num_entities, seed)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        refs = [{"text": reference_entry(e).text, "entity": e.name} for e in world.entities]
        docs = documents(world, docs_per_entity, seed)
        qa = qa_set(world, qa_questions, seed)
        sft = sft_sets(world, sft_conversations, seed)
        facts = [{"entity": e.name, "kind": e.kind, "attribute": a, "value": v, "qa_held_out": e.name in world.qa_entities}
                 for e in world.entities for a, v in e.facts.items()]
        counts = {
            "reference": write_jsonl(tmp / "reference.jsonl", refs),
            "documents": write_jsonl(tmp / "documents.jsonl", docs),
            "qa": write_jsonl(tmp / "qa.jsonl", qa),
            "facts": write_jsonl(tmp / "facts.jsonl", facts),
        }
        (tmp / "sft").mkdir()
        for name, recs in sft.items():
            counts[f"sft_{name}"] = write_jsonl(tmp / "sft" / f"{name}.jsonl", recs)
    return counts
