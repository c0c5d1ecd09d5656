"""The built-in long-context suite (``kunlun eval --task ruler``): RULER's synthetic tasks, offline and seeded.

Faithful to RULER (Hsieh et al. 2024, NVIDIA/RULER ``scripts/data/synthetic``): the same needle sentence, prompt
templates, answer prefixes, answer budgets (tokens to generate) and task configurations (``scripts/synthetic.yaml``)
— 8 needle-in-a-haystack variants, variable tracking (``vt``), common-word (``cwe``) and frequent-word (``fwe``)
extraction — plus the classic passkey retrieval (Mohtashami & Jaggi 2023). RULER's QA tasks need downloaded
datasets and are left out. Where RULER downloads something the suite uses local material instead:

* RULER's ``essay`` haystack (Paul Graham's essays) → ``valtext``: sentences of the checkpoint's own validation
  split (the data it was trained on, or ``--data``);
* RULER's ``noise`` haystack → ``filler``: "The grass is green. …" repeated (the same sentence);
* RULER's ``needle`` haystack: distractor needles, as in RULER;
* ``noise``: sentences of random made-up words (``niah_single_noise``, not in RULER);
* needle keys and word lists from :mod:`.ruler_words` instead of ``wonderwords`` and ``english_words.json``.

Lengths count the checkpoint's own tokens and are exact: a sample at length ``L`` is a prompt of exactly
``L - budget`` tokens (RULER's ``max_seq_length`` includes the tokens to generate). The haystack is grown a
unit (sentence, list item) at a time to the largest size that fits, then topped up with a prefix of the next
unit, character by character, to the exact count. No torch here: the tokenizer is any ``encode(text) -> ids``.
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .ruler_words import key_word, made_up_words

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER: np.round(np.linspace(0, 100, 40))
HAYSTACKS = ("filler", "valtext", "needle", "noise")
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)  # Table 3's columns
DEFAULT_PER_LENGTH = 25

# RULER's scripts/data/synthetic/constants.py: (template, answer prefix, tokens to generate)
TEMPLATES: dict[str, tuple[str, str, int]] = {
    "niah": ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz "
             "you about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} "
             "mentioned in the provided text?",
             " The special magic {type_v} for {query} mentioned in the provided text are", 128),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: ", 30),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:", 120),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
            "dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:", 50),
    # Mohtashami & Jaggi (2023), as LongLoRA and YaRN evaluate it
    "passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
                "quiz you about the important information there.\n{context}\nWhat is the pass key?",
                " The pass key is", 16),
}


class RulerError(ValueError):
    """A suite setting that cannot be generated (unknown task, bad length list, a length too short)."""


class TooShort(RulerError):
    """A length shorter than a task's prompt without any haystack plus its answer budget."""


@dataclass(frozen=True)
class Spec:
    """One task of the suite (RULER's ``synthetic.yaml`` entry)."""

    name: str
    family: str  # niah, vt, cwe, fwe, passkey
    haystack: str = "filler"
    key: str = "words"  # niah: numbers, words or uuids
    value: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1
    hops: int = 4  # vt
    metric: str = "all"  # RULER's string_match_all (every synthetic task) or string_match_part (its QA)

    @property
    def budget(self) -> int:
        """Tokens to generate (RULER's ``tokens_to_generate``)."""
        return TEMPLATES[self.family][2]


SUITE: dict[str, Spec] = {s.name: s for s in (
    Spec("niah_single_1", "niah", "filler"),
    Spec("niah_single_2", "niah", "valtext"),
    Spec("niah_single_3", "niah", "valtext", value="uuids"),
    Spec("niah_single_noise", "niah", "noise"),
    Spec("niah_multikey_1", "niah", "valtext", keys=4),
    Spec("niah_multikey_2", "niah", "needle"),
    Spec("niah_multikey_3", "niah", "needle", key="uuids", value="uuids"),
    Spec("niah_multivalue", "niah", "valtext", values=4),
    Spec("niah_multiquery", "niah", "valtext", queries=4),
    Spec("vt", "vt", "filler"),
    Spec("cwe", "cwe", "filler"),
    Spec("fwe", "fwe", "filler"),
    Spec("passkey", "passkey", "filler"),
)}


# ------------------------------------------------------------------------------------------------- settings
def parse_length(text: str) -> int:
    """``"4k"`` → 4096, ``"128K"`` → 131072, ``"1m"`` → 1048576, ``"300"`` → 300 (k = 1024 tokens)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise RulerError(f"length {text!r} is not a token count: write e.g. 4096, 4k or 128K (k = 1024)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise RulerError(f"length {text!r} must be a whole number of tokens > 0")
    return int(value)


def parse_lengths(text: str) -> tuple[int, ...]:
    """A comma-separated length list (``"1k,2k,4k"``) → sorted distinct token counts."""
    items = text.split(",")
    if not text.strip() or any(not i.strip() for i in items):
        raise RulerError(f"--lengths {text!r}: give comma-separated token counts such as 1k,2k,4k (k = 1024)")
    return tuple(sorted({parse_length(i) for i in items}))


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """``None`` → every task of the suite; ``"niah_single_1,vt"`` → those (``niah`` names every NIAH task)."""
    if text is None:
        return tuple(SUITE)
    names: list[str] = []
    for item in (i.strip() for i in text.split(",")):
        group = [n for n in SUITE if n.startswith(item + "_")] if item == "niah" else [item]
        for name in group:
            if name not in SUITE:
                raise RulerError(f"ruler has no task {name!r}: choose from {', '.join(SUITE)} (or niah for all "
                                 "NIAH tasks), comma-separated, e.g. ruler=niah_single_1,vt")
            if name not in names:
                names.append(name)
    return tuple(names)


def length_label(n: int) -> str:
    """4096 → ``4K``, 131072 → ``128K``, 300 → ``300``."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """The RNG seed of one sample, from SHA-256 (the same on every machine and Python)."""
    digest = hashlib.sha256(f"ruler:{seed}:{task}:{length}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# ------------------------------------------------------------------------------------------------- drafts
@dataclass
class Draft:
    """A prompt before its length is fitted: the haystack units (needles inserted) and how they are framed."""

    template: str  # with {context}
    answer_prefix: str
    units: list[str]
    joiner: str
    pad_source: str  # the text a top-up is a prefix of
    answers: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # depths, needles, haystack units

    def render(self, pad: int = 0, wrap: Callable[[str], str] | None = None) -> str:
        """The whole prompt with the first ``pad`` characters of the top-up after the haystack."""
        context = self.joiner.join(self.units) + (self.joiner + self.pad_source)[:pad]
        text = self.template.replace("{context}", context)
        return (wrap(text) if wrap else text) + self.answer_prefix


def insert_at_depths(units: list[str], items: list[str], depths: list[int]) -> list[str]:
    """``units`` with ``items[i]`` placed before unit ``int(len(units) * depths[i] / 100)`` (RULER's rule); items
    at the same depth keep their order."""
    out = list(units)
    order = sorted(range(len(items)), key=lambda i: (depths[i], i), reverse=True)
    for i in order:
        out.insert(int(len(units) * depths[i] / 100), items[i])
    return out


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # RULER: 7 digits
    if kind == "words":
        return key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _haystack(kind: str, rng: random.Random, n: int, sentences: list[str] | None, type_v: str = "numbers",
              key: str = "words", avoid: frozenset[str] = frozenset()) -> tuple[list[str], str]:
    """``n + 2`` haystack units of ``kind`` (the last two are the top-up's source) and their joiner."""
    if kind == "filler":
        return [FILLER] * (n + 2), "\n"
    if kind == "valtext":
        if not sentences:
            raise RulerError("the valtext haystack needs validation text: --data DIR (a `kunlun prepare` folder)")
        start = rng.randrange(len(sentences))
        return [sentences[(start + i) % len(sentences)] for i in range(n + 2)], " "
    if kind == "needle":
        units = []
        while len(units) < n + 2:
            k = _random_value(key, rng)
            if k not in avoid:  # a distractor never carries a queried key
                units.append(NEEDLE.format(type_v=type_v, key=k, value=_random_value(type_v, rng)))
        return units, "\n"
    if kind == "noise":
        words = made_up_words(rng, 2000, 2)
        return [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(n + 2)], " "
    raise RulerError(f"unknown haystack {kind!r}: one of {', '.join(HAYSTACKS)}")


def _niah(spec: Spec, rng: random.Random, n: int, sentences: list[str] | None) -> Draft:
    """RULER's ``niah.py``: keys with values as needles at random depths; the answer is the queried keys' values."""
    num_k = max(spec.keys, spec.queries)
    keys: list[str] = []
    while len(keys) < num_k:
        k = _random_value(spec.key, rng)
        if k not in keys:
            keys.append(k)
    values = [[_random_value(spec.value, rng) for _ in range(spec.values)] for _ in keys]
    needles = [NEEDLE.format(type_v=spec.value, key=k, value=v) for k, vs in zip(keys, values, strict=True)
               for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    queried = rng.sample(range(num_k), spec.queries)
    answers = [v for i in queried for v in values[i]]
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, _ = TEMPLATES["niah"]
    whole, type_v = template + "\x00" + prefix, spec.value
    if spec.queries * spec.values == 1:  # RULER's singular wording
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            whole = whole.replace(a, b)
        type_v = type_v[:-1]
    template, prefix = whole.replace("{type_v}", type_v).replace("{query}", query).split("\x00")
    units, joiner = _haystack(spec.haystack, rng, n, sentences, spec.value, spec.key, frozenset(keys))
    return Draft(template, prefix, insert_at_depths(units[:n], needles, depths), joiner, joiner.join(units[n:]),
                 answers, {"depths": depths, "needles": needles, "haystack_units": n})


def _chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    """RULER's ``generate_chains`` for one chain: its variable names and statements."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99999)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, statements


def _vt_prompt(rng: random.Random, n: int, hops: int, letters: int) -> Draft:
    """A variable-tracking prompt: one chain's statements at random depths of ``n`` filler lines."""
    names, statements = _chain(rng, hops, letters)
    depths = sorted(rng.sample(DEPTHS, len(statements)))
    template, prefix, _ = TEMPLATES["vt"]
    value = statements[0].rsplit("= ", 1)[1]
    for a, b in (("{query}", value), ("{num_v}", str(hops + 1))):
        template, prefix = template.replace(a, b), prefix.replace(a, b)
    return Draft(template, prefix, insert_at_depths([FILLER] * n, statements, depths), "\n",
                 "\n".join([FILLER] * 2), names, {"depths": depths, "needles": statements, "haystack_units": n})


def _vt(spec: Spec, rng: random.Random, n: int, sentences: list[str] | None) -> Draft:
    """RULER's ``variable_tracking.py``: one chain of ``hops`` assignments in filler lines, after a solved example
    (3-letter names, 10 filler lines); the answer is every name of the chain."""
    example = _vt_prompt(random.Random(rng.getrandbits(64)), 10, spec.hops, 3)
    shot = example.render() + " " + " ".join(example.answers) + "\n"
    sample = _vt_prompt(rng, n, spec.hops, 5)
    sample.template = shot + sample.template
    return sample


def _numbered(words: list[str], start: int = 0) -> list[str]:
    return [f"{start + i + 1}. {w}" for i, w in enumerate(words)]


def _cwe_list(rng: random.Random, n: int, common_repeats: int, uncommon_repeats: int) -> tuple[list[str], list[str]]:
    """RULER's ``get_example``: ``n`` distinct words, the first 10 common; (shuffled list, common words)."""
    words = made_up_words(rng, max(n, 10))
    common, uncommon = words[:10], words[10:]
    items = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(items)
    return items, common


def _cwe(spec: Spec, rng: random.Random, n: int, sentences: list[str] | None, long: bool = True) -> Draft:
    """RULER's ``common_words_extraction.py``: 10 words 30 times each (6 below 4K tokens) among words 3 times
    each (once below 4K), after one solved example; the answer is the 10 common words."""
    template, prefix, _ = TEMPLATES["cwe"]
    ex_items, ex_common = _cwe_list(random.Random(rng.getrandbits(64)), 40 if long else 20, 10 if long else 3,
                                    3 if long else 1)
    example = (template.replace("{context}", " ".join(_numbered(ex_items))) + prefix + " "
               + " ".join(_numbered(ex_common)) + "\n")
    items, common = _cwe_list(rng, n, 30 if long else 6, 3 if long else 1)
    rare = [w for w in items if w not in common] or made_up_words(rng, 1)
    pad = " ".join(_numbered([rare[i % len(rare)] for i in range(8)], len(items)))  # never a common word
    return Draft(example + template, prefix, _numbered(items), " ", pad, common, {"haystack_units": n})


def _fwe(spec: Spec, rng: random.Random, n: int, sentences: list[str] | None, vocab_size: int = 100) -> Draft:
    """RULER's ``freq_words_extraction.py``: ``n`` coded words (6 letters) with Zipf counts (α = 2) over a
    vocabulary whose most frequent entry is the noise ``...``; the answer is the next three most frequent."""
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = "..."  # RULER: the top-ranked word is noise
    zeta2 = 1.6449340668482264  # ζ(2) = π²/6
    items = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -2 / zeta2))]
    rng.shuffle(items)
    template, prefix, _ = TEMPLATES["fwe"]
    return Draft(template, prefix, items, " ", " ".join(["..."] * 64), vocab[1:4], {"haystack_units": n})


def _passkey(spec: Spec, rng: random.Random, n: int, sentences: list[str] | None) -> Draft:
    """Passkey retrieval: a 5-digit key stated once at a random depth of repeated filler."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = rng.choice(DEPTHS)
    template, prefix, _ = TEMPLATES["passkey"]
    units = insert_at_depths([FILLER] * n, [needle], [depth])
    return Draft(template, prefix, units, " ", " ".join([FILLER] * 2), [key],
                 {"depths": [depth], "needles": [needle], "haystack_units": n})


def draft(spec: Spec, seed: int, n: int, length: int, sentences: list[str] | None = None) -> Draft:
    """The prompt of task ``spec`` with ``n`` haystack units, from a fresh RNG seeded ``seed`` (so keys, values and
    depths do not change with ``n``)."""
    rng = random.Random(seed)
    if spec.family == "niah":
        return _niah(spec, rng, n, sentences)
    if spec.family == "vt":
        return _vt(spec, rng, n, sentences)
    if spec.family == "cwe":
        return _cwe(spec, rng, n, sentences, long=length >= 4096)
    if spec.family == "fwe":
        return _fwe(spec, rng, n, sentences, vocab_size=max(5, length // 50))  # RULER: max_seq_length // 50
    return _passkey(spec, rng, n, sentences)


# ------------------------------------------------------------------------------------------------- exact lengths
Count = Callable[[str], int]


def _largest_fitting(fits: Callable[[int], bool], start: int) -> int:
    """The largest ``n >= 0`` with ``fits(n)`` (``fits(0)`` holds), searched from ``start`` by galloping then
    bisection (token counts grow with ``n`` up to a token or two)."""
    n, step = max(0, start), max(1, start // 16)
    if fits(n):
        lo = n
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = n
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(0, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _top_up(count: Callable[[int], int], longest: int, target: int, window: int = 48) -> int | None:
    """The number of top-up characters that makes the prompt exactly ``target`` tokens, or None: bisection, then
    the ``window`` characters either side (a character that adds two tokens can step over the target)."""
    lo, hi = 0, longest + 1  # count(lo) <= target; hi: past the end
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
    near = sorted(range(max(0, lo - window), min(longest, lo + window) + 1), key=lambda c: abs(c - lo))
    return next((c for c in near if count(c) == target), None)


class _PartCounter:
    """Token counts of a draft's prompt as the sum of its parts' counts (cached): the text before the haystack, each
    unit with its joiner, the top-up, the text after. Exact wherever the tokenizer's pre-tokenizer splits at those
    seams (byte-level BPE splits before a space or newline); :func:`fit` checks the final prompt whole."""

    SENTINEL = "\x00KUNLUN-RULER-CONTEXT\x00"

    def __init__(self, count: Count, wrap: Callable[[str], str] | None) -> None:
        self.count, self.wrap = count, wrap
        self.parts: dict[str, int] = {}
        self.frames: dict[tuple[str, str], tuple[str, str] | None] = {}

    def part(self, text: str) -> int:
        """Tokens of ``text``: the sum over its words (split before each space), each counted once."""
        if text not in self.parts:
            words = [w for w in re.split(r"(?= )", text) if w]
            self.parts[text] = (self.count(text) if len(words) == 1 else sum(self.part(w) for w in words)) if text \
                else 0
        return self.parts[text]

    def frame(self, d: Draft) -> tuple[str, str] | None:
        """(text before, text after) the haystack of ``d``'s rendered prompt; None if the wrap hides the seam."""
        key = (d.template, d.answer_prefix)
        if key not in self.frames:
            whole = Draft(d.template, d.answer_prefix, [self.SENTINEL], "", "", []).render(0, self.wrap)
            pieces = whole.split(self.SENTINEL)
            self.frames[key] = (pieces[0], pieces[1]) if len(pieces) == 2 else None
        return self.frames[key]

    def __call__(self, d: Draft, pad: int) -> int:
        frame = self.frame(d)
        if frame is None:
            return self.count(d.render(pad, self.wrap))
        head, tail = frame
        units = sum(self.part(u if i == 0 else d.joiner + u) for i, u in enumerate(d.units))
        return self.part(head) + units + self.part((d.joiner + d.pad_source)[:pad]) + self.part(tail)


def _search(make: Callable[[int], Draft], tokens: Callable[[Draft, int], int], target: int,
            hint: int) -> tuple[Draft, int, int] | None:
    """(draft, top-up, haystack units) whose ``tokens`` are exactly ``target``, or None."""
    n = _largest_fitting(lambda k: tokens(make(k), 0) <= target, hint)
    for size, plain in ((n, False), (n - 1, False), (n, True), (n - 1, True), (n - 2, True)):
        if size < 0:
            continue
        d = make(size)
        if plain:  # the top-up from the filler instead: ASCII words after single spaces (19 words, 8+ tokens)
            d.pad_source = " ".join([FILLER] * ((target - tokens(d, 0)) // 8 + 2))
        pad = _top_up(lambda c, d=d: tokens(d, c), len(d.joiner + d.pad_source), target)
        if pad is not None:
            return d, pad, size
    return None


def fit(spec: Spec, seed: int, length: int, target: int, count: Count, sentences: list[str] | None = None,
        wrap: Callable[[str], str] | None = None, hint: int | None = None) -> tuple[Draft, int]:
    """The draft and top-up length whose prompt is exactly ``target`` tokens (``count`` of the rendered text).

    Searched with summed part counts, checked with one count of the whole prompt (searched again with whole
    counts if the parts were off). Raises RulerError when even the prompt without a haystack is longer than
    ``target``.
    """
    def make(n: int) -> Draft:
        return draft(spec, seed, n, length, sentences)

    def exact(d: Draft, pad: int) -> int:
        return count(d.render(pad, wrap))

    bare = exact(make(0), 0)
    if bare > target:
        raise TooShort(f"ruler {spec.name} at {length_label(length)} tokens: the prompt without a haystack takes "
                         f"{bare} tokens and the answer {length - target}, more than {length}: choose longer --lengths "
                         "or leave this task out (ruler=TASK,…)")
    parts = _PartCounter(count, wrap)
    if hint is None:
        hint = int((target - bare) / max((parts(make(16), 0) - parts(make(0), 0)) / 16, 0.1))
    offset = 0  # what the seams between the parts add or save, learnt from the whole prompt
    for _ in range(3):
        found = _search(make, parts, target - offset, hint)
        if found is None:
            break
        hint, whole = found[2], exact(found[0], found[1])
        if whole == target:
            return found[0], found[1]
        offset = whole - (target - offset)  # the seams' share of the whole count
    found = _search(make, exact, target, hint)
    if found is None:
        raise RulerError(f"ruler {spec.name}: no prompt of exactly {target} tokens found near {hint} haystack units "
                         "(the tokenizer merges the top-up text unevenly); try another --seed")
    return found[0], found[1]


def make_sample(name: str, length: int, index: int, count: Count, *, seed: int = 0,
                sentences: list[str] | None = None, budget: int | None = None,
                wrap: Callable[[str], str] | None = None, hint: int | None = None) -> dict[str, Any]:
    """Sample ``index`` of task ``name`` at ``length`` tokens: a record with the ``prompt`` (exactly ``length -
    budget`` tokens by ``count``), the ``answer`` values and where the needles are (``depths`` in percent of the
    haystack, ``needles``, ``haystack_units``)."""
    spec = SUITE[name]
    budget = spec.budget if budget is None else budget
    if length - budget < 1:
        raise RulerError(f"ruler {name}: length {length} leaves no room for a prompt after the {budget} answer tokens")
    s = sample_seed(seed, name, length, index)
    d, pad = fit(spec, s, length, length - budget, count, sentences, wrap, hint)
    return {"id": f"{name}-{length_label(length)}-{index}", "task": name, "length": length, "sample": index,
            "haystack": spec.haystack if spec.family == "niah" else spec.family, "prompt": d.render(pad, wrap),
            "prompt_tokens": length - budget, "budget": budget, "answer": d.answers, "metric": spec.metric,
            "pad_chars": pad, **d.info}


def valtext_sentences(text: str, limit: int = 200_000, words: int = 50) -> list[str]:
    """Validation text as haystack sentences (whitespace collapsed, split after ``.``, ``!`` or ``?``, a longer run
    than ``words`` words — code, lists — cut into pieces of that many), at most ``limit`` of them; RULER inserts its
    needles between the sentences of its essays the same way."""
    flat = re.sub(r"\s+", " ", text).strip()
    out: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", flat):
        parts = sentence.split(" ")
        out += [" ".join(parts[i:i + words]) for i in range(0, len(parts), words) if parts[i]]
        if len(out) >= limit:
            break
    return out[:limit]


__all__ = ["DEFAULT_LENGTHS", "DEFAULT_PER_LENGTH", "DEPTHS", "FILLER", "HAYSTACKS", "NEEDLE", "SUITE", "TEMPLATES",
           "Draft", "RulerError", "Spec", "TooShort", "draft", "fit", "insert_at_depths", "length_label", "make_sample",
           "parse_length", "parse_lengths", "parse_tasks", "sample_seed", "valtext_sentences"]
