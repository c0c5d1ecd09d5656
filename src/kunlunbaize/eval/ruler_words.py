"""Word material of the long-context suite (:mod:`.ruler`): needle keys and made-up words, no download.

RULER draws its needle keys as ``adjective-noun`` pairs from the ``wonderwords`` lists; the suite draws them from
the short lists below (96 × 96 = 9,216 pairs). Common- and frequent-word extraction and the noise haystack
use made-up words of consonant-vowel syllables, so no word list is needed and no word means anything to the model.
"""

from __future__ import annotations

import random

_ADJECTIVES = """
able acid agile amber ancient angry arctic ashen autumn azure bald bitter black blond bold brave brief bright
broad bronze calm cheap chilly civic clean clever cloudy coarse cold cosmic crisp cruel curly damp dark deep
dense dizzy dry dusty eager early earthy easy elder empty equal faint fancy fast fierce final firm flat fluffy
fond frosty gentle giant glad golden grand green grumpy happy hard hasty heavy hidden hollow humble icy idle
jolly keen kind large lazy light lively lonely loud lucky lunar mellow merry mighty misty modern moist narrow
neat nimble noble odd olive
"""

_NOUNS = """
acorn anchor apple arrow attic badge bakery banjo barn basket beacon bell bicycle blanket boat bottle bridge
broom bucket butter button cabin camera candle canoe canyon carpet castle cellar chair cherry chimney circus
clock cloud comet copper cottage crayon crown cup curtain desert dolphin donkey drum eagle engine feather fence
fiddle field forest fountain garden garlic ginger glacier globe guitar hammer harbor helmet hill honey island
jacket kettle kitten ladder lantern lemon library lizard magnet maple marble meadow mirror mitten needle
orchard otter paddle parrot pebble pepper piano pillow planet pocket pumpkin rabbit river saddle tulip
"""

ADJECTIVES = tuple(_ADJECTIVES.split())
NOUNS = tuple(_NOUNS.split())

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)  # 70


def key_word(rng: random.Random) -> str:
    """A needle key as RULER writes its ``words`` keys: ``adjective-noun``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def made_up_word(index: int, syllables: int = 3) -> str:
    """The ``index``-th made-up word of ``syllables`` consonant-vowel syllables (distinct for distinct indices
    below ``70 ** syllables``)."""
    parts = []
    for _ in range(syllables):
        index, s = divmod(index, len(_SYLLABLES))
        parts.append(_SYLLABLES[s])
    return "".join(parts)


def made_up_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct made-up words drawn at random."""
    space = len(_SYLLABLES) ** syllables
    if n > space:
        raise ValueError(f"only {space:,} distinct words of {syllables} syllables exist; {n:,} asked")
    return [made_up_word(i, syllables) for i in rng.sample(range(space), n)]


__all__ = ["ADJECTIVES", "NOUNS", "key_word", "made_up_word", "made_up_words"]
