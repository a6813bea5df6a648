"""Offline RULER-style task generators: every prompt built from a seed, with its answers and a scoring rule.

The RULER families that need no download (Hsieh et al., 2024, arXiv 2404.06654), re-written from the
paper's descriptions: needle retrieval (single, multi-key, multi-value, multi-query) in haystacks of
repeated noise, of real prose (``pydoc_data.topics``) and of key-like distractor needles; variable
tracking; common- and frequent-word extraction; and a document QA whose facts are stated once each (the
documents are prose windows, each carrying one fact of the same form about a different entity, so the
question has exactly one answer). Random words come from ``wonderwords`` (as in RULER), drawn with our own
seeded ``random.Random`` so a seed fixes the prompt.

A prompt is the model's chat template around ``instruction + context`` and the question, followed by an
answer prefix (RULER's format); without a template, plain text. It is split into ``context_ids`` (what
gets compressed) and ``question_ids`` (fed after the compressed context), and sized so that both together
hold at most ``length`` tokens (within one haystack unit of it).

Scoring is RULER's string match: the fraction of expected strings found (case-insensitive) in the output.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."

#: name -> (family, options); the order is the benchmark's task order
TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_noise": ("niah", dict(haystack="noise")),
    "niah_single_prose": ("niah", dict(haystack="prose")),
    "niah_multikey_prose": ("niah", dict(haystack="prose", keys=4)),
    "niah_multikey_needles": ("niah", dict(haystack="needles")),
    "niah_multivalue": ("niah", dict(haystack="prose", values=4)),
    "niah_multiquery": ("niah", dict(haystack="prose", keys=4, queries=4)),
    "vt": ("vt", dict(hops=4)),
    "cwe": ("cwe", dict(common=10)),
    "fwe": ("fwe", dict(top=3)),
    "qa": ("qa", dict(sentences_per_doc=6)),
}
#: generation budget per family (tokens); decoding stops earlier once every answer is in the output
MAX_NEW_TOKENS = {"niah": 16, "niah_many": 48, "vt": 32, "cwe": 48, "fwe": 24, "qa": 12}


@dataclass
class RulerSample:
    """One prompt: its text parts, token ids, expected strings and generation budget."""

    task: str
    length: int  # the target: len(context_ids) + len(question_ids) <= length
    seed: int
    context: str  # instruction + haystack (the compressed part, before the chat template)
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    context_ids: list[int] = field(default_factory=list)
    question_ids: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def score(output: str, answers: list[str]) -> float:
    """RULER's string match: the fraction of ``answers`` that occur in ``output`` (case-insensitive)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


# -- word sources -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    """The offline prose corpus as whitespace-normalized sentences (haystack units)."""
    from kvpress_like.data import offline_corpus

    parts = re.split(r"(?<=[.!?])\s+", offline_corpus())
    return tuple(s for s in (" ".join(p.split()) for p in parts) if 1 < len(s) <= 300)  # short units: exact sizes


@lru_cache(maxsize=1)
def _corpus_words() -> frozenset[str]:
    from kvpress_like.data import offline_corpus

    return frozenset(re.findall(r"[a-z]+", offline_corpus().lower()))


@lru_cache(maxsize=1)
def _words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives) from wonderwords: lowercase, 3-10 letters, absent from the prose corpus, so an
    answer made of them can only come from its needle."""
    from importlib.resources import files

    seen = _corpus_words()

    def pick(name: str) -> tuple[str, ...]:  # wonderwords' own lists (its RandomWord builds a slow trie)
        words = files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8").splitlines()
        return tuple(sorted({w for w in words if w.isalpha() and w.islower() and 3 <= len(w) <= 10 and w not in seen}))

    return pick("nounlist.txt"), pick("adjectivelist.txt")


def _distinct(rng: random.Random, draw, n: int, taken: set) -> list:
    out = []
    while len(out) < n:
        x = draw()
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


def _key(rng: random.Random) -> str:
    nouns, adjectives = _words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """``units`` with ``items`` inserted between units at relative ``depths`` (stable for equal depths)."""
    out = list(units)
    for item, depth in sorted(zip(items, depths), key=lambda x: x[1], reverse=True):
        out.insert(round(depth * len(units)), item)
    return out


def _prose(rng: random.Random, n: int) -> list[str]:
    sentences = _sentences()
    start = rng.randrange(len(sentences))
    return [sentences[(start + i) % len(sentences)] for i in range(n)]


# -- families: each returns (context, question, answer prefix, answers) for ``n`` haystack units -------
def _niah(rng: random.Random, n: int, haystack: str, keys: int = 1, values: int = 1, queries: int = 1) -> tuple:
    taken: set = set()
    names = _distinct(rng, lambda: _key(rng), keys, taken)
    numbers = {k: _distinct(rng, lambda: _number(rng), values, taken) for k in names}
    needles = [NEEDLE.format(key=k, value=v) for k in names for v in numbers[k]]
    depths = [rng.random() for _ in needles]
    hay_rng = random.Random(rng.random())  # the haystack draws after the needles: they stay fixed as n varies
    if haystack == "noise":
        units = [NOISE] * n
    elif haystack == "prose":
        units = _prose(hay_rng, n)
    elif haystack == "needles":
        units = []
        for _ in range(n):  # key, then value, per unit: the first units do not depend on n
            k = _distinct(hay_rng, lambda: _key(hay_rng), 1, taken)[0]
            units.append(NEEDLE.format(key=k, value=_distinct(hay_rng, lambda: _number(hay_rng), 1, taken)[0]))
    else:
        raise ValueError(f"unknown haystack {haystack!r}; use noise, prose or needles")
    context = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n" + " ".join(_insert(units, needles, depths)))
    asked = names[:queries]
    listed = asked[0] if queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    many = values > 1 or queries > 1
    noun = "numbers" if many else "number"
    question = (f"What {'are all the' if many else 'is the'} special magic {noun} for {listed} mentioned in the "
                "provided text?")
    prefix = f"The special magic {noun} for {listed} mentioned in the provided text {'are' if many else 'is'}"
    return context, question, prefix, [v for k in asked for v in numbers[k]]


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _vt(rng: random.Random, n: int, hops: int) -> tuple:
    names = _distinct(rng, lambda: _variable_name(rng), hops + 1, set())
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               + " ".join(_insert([NOISE] * n, chain, depths)))
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")
    return context, question, prefix, names


def _cwe(rng: random.Random, n: int, common: int, length: int) -> tuple:
    nouns, _ = _words()
    words: list[str] = []
    clash = lambda w: any(w in c or c in w for c in words[:common])  # noqa: E731 (no answer inside another word)
    while len(words) < common:
        w = rng.choice(nouns)
        if not clash(w):
            words.append(w)
    words += [w for w in rng.sample(nouns, common + n + 200) if w not in words and not clash(w)][:n]
    frequent = max(10, 10 * length // 1024)  # each common word; the n rare ones appear 3 times
    items = [w for w in words[:common] for _ in range(frequent)] + [w for w in words[common:] for _ in range(3)]
    rng.shuffle(items)
    context = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)))
    question = f"Question: What are the {common} most common words in the above list?"
    prefix = f"Answer: The top {common} words that appear most often in the list are:"
    return context, question, prefix, words[:common]


def _fwe(rng: random.Random, n: int, top: int, alpha: float = 2.0) -> tuple:
    """Coded words with Zipf counts fixed by construction (count of rank k ~ n / k^alpha), so the top
    ``top`` are unambiguous: each count is strictly above the next."""
    counts, total = [], 0
    for k in range(1, n + 1):
        c = max(1, int(n / k**alpha / 1.6449))
        counts.append(c)
        total += c
        if total >= n:
            break
    if len(counts) <= top or counts[top - 1] <= counts[top]:
        raise ValueError(f"fwe needs more units for an unambiguous top {top}; got n={n}")
    vocab = _distinct(rng, lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6))),
                      len(counts), set(_corpus_words()))
    items = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(items)
    context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
               "frequently appeared coded words. " + " ".join(items) + " ....")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return context, question, prefix, vocab[:top]


def _qa(rng: random.Random, n: int, sentences_per_doc: int) -> tuple:
    """Documents of prose, each with one fact "The <adj> <noun> is kept in the <place>."; one is asked."""
    nouns, adjectives = _words()
    docs = max(1, n // sentences_per_doc)
    target_depth = rng.random()
    prose = _prose(random.Random(rng.random()), docs * sentences_per_doc)
    taken: set = set()
    things, places, parts = [], [], []
    for d in range(docs):  # one draw sequence per document: the first documents do not depend on n
        things.append((rng.choice(adjectives), _distinct(rng, lambda: rng.choice(nouns), 1, taken)[0]))
        places += _distinct(rng, lambda: rng.choice(nouns), 1, taken)  # no noun twice: each answer is unique
        body = prose[d * sentences_per_doc : (d + 1) * sentences_per_doc]
        fact = f"The {things[d][0]} {things[d][1]} is kept in the {places[d]}."
        parts.append(f"Document {d + 1}:\n" + " ".join(_insert(body, [fact], [rng.random()])))
    t = min(docs - 1, int(target_depth * docs))
    thing = f"{things[t][0]} {things[t][1]}"
    context = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n" + "\n\n".join(parts))
    question = f"Answer the question based on the given documents.\n\nQuestion: Where is the {thing} kept?"
    return context, question, f"Answer: The {thing} is kept in the", [places[t]]


def _generate(task: str, seed: int, n: int, length: int) -> tuple:
    family, options = TASKS[task]
    rng = random.Random(f"{task}/{length}/{seed}")
    if family == "niah":
        return _niah(rng, n, **options)
    if family == "vt":
        return _vt(rng, n, **options)
    if family == "cwe":
        return _cwe(rng, n, length=length, **options)
    if family == "fwe":
        return _fwe(rng, n, **options)
    return _qa(rng, n, **options)


# -- prompts --------------------------------------------------------------------------------------------
def encode(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): the chat template around ``context + question`` (plain text without a
    template), split where the question starts; the question part ends with the answer prefix."""
    tail = "\n\n" + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + tail}], tokenize=False,
                                             add_generation_prompt=True)
        cut = text.rindex(tail)
        head, rest = text[:cut], text[cut:] + answer_prefix
        bos = []
    else:
        head, rest = context, tail + "\n" + answer_prefix
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return bos + ids(head), ids(rest)


def _min_units(task: str) -> int:
    return 40 if TASKS[task][0] == "fwe" else 0


def ruler_sample(tokenizer, task: str, length: int, seed: int) -> RulerSample:
    """The ``seed``-th prompt of ``task`` with at most ``length`` tokens (the most haystack units that fit)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")

    def build(n: int) -> RulerSample:
        context, question, prefix, answers = _generate(task, seed, n, length)
        family = TASKS[task][0]
        budget = MAX_NEW_TOKENS["niah_many" if family == "niah" and len(answers) > 1 else family]
        c, q = encode(tokenizer, context, question, prefix)
        return RulerSample(task, length, seed, context, question, prefix, answers, budget, c, q)

    lo = _min_units(task)
    best = build(lo)
    if best.tokens > length:
        raise ValueError(f"length={length} is too short for task {task!r} (needs more than {best.tokens} tokens)")
    hi = lo + 64  # double until too long, then bisect: tokens grow with n (haystacks are prefix-stable)
    while (sample := build(hi)).tokens <= length:
        lo, best, hi = hi, sample, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        sample = build(mid)
        if sample.tokens <= length:
            lo, best = mid, sample
        else:
            hi = mid
    return best
