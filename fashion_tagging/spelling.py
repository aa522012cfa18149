"""Spelling correction of the words a model's vocabulary does not know, before the text is read.

A typo makes a whole word unknown to the fused model's word vocabulary (the LSTM reads ``[UNK]``)
and to the text expert's word part; only the expert's character n-grams keep some of its evidence.
A shop's titles carry typos, so the tagger maps each unknown word to the vocabulary word within
``max_distance`` edits (Damerau: a swap of neighbouring letters is one edit), the most frequent
one on a tie, with SymSpell's deletion index (``symspellpy``). Known words, short words, numbers
and words with no close match are left as they are, and so are the words the text expert knows
(its vocabulary is larger than the LSTM's: a rare word it reads is better kept than replaced by a
frequent neighbour). The vocabulary is the model's own (fitted on its training texts, most
frequent first), so nothing here knows this catalog.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterable, Sequence

from symspellpy import SymSpell, Verbosity

# Words shorter than this are left alone: a three-letter word is one edit from dozens of others.
MIN_WORD_LENGTH = 4
_PUNCTUATION = str.maketrans("", "", string.punctuation)  # what the text vectorizer strips
_CACHED_TOKENS = 200_000  # distinct tokens remembered (a lookup of an unknown word costs tens of microseconds)


def standardized(token: str) -> str:
    """A whitespace token as the model's text vectorizer sees it (lower case, punctuation stripped)."""
    return token.lower().translate(_PUNCTUATION)


class SpellingCorrector:
    """Unknown words -> their closest vocabulary word; ``vocabulary``: most frequent first;
    ``also_known``: more words to leave alone (never corrected to)."""

    def __init__(self, vocabulary: Sequence[str], max_distance: int = 1, min_length: int = MIN_WORD_LENGTH,
                 also_known: Iterable[str] = ()):
        if max_distance < 1:
            raise ValueError(f"max_distance must be at least 1 (0 means no corrector), got {max_distance}")
        self.max_distance = max_distance
        self.min_length = min_length
        self.known = frozenset(vocabulary).union(also_known)
        self._index = SymSpell(max_dictionary_edit_distance=max_distance, prefix_length=7)
        words = [w for w in vocabulary if w.isalpha()]
        for rank, word in enumerate(words):  # the rank stands in for a count: ties go to the more frequent
            self._index.create_dictionary_entry(word, len(words) - rank)
        # Per distinct token: a catalog's texts repeat the same few thousand words.
        self.correct_token = functools.lru_cache(maxsize=_CACHED_TOKENS)(self._correct_token)

    def _correct_token(self, token: str) -> str:
        """``token`` itself, or the vocabulary word it was meant to be when the model does not know it."""
        word = standardized(token)
        if len(word) < self.min_length or word in self.known or not word.isalpha():
            return token
        found = self._index.lookup(word, Verbosity.TOP, max_edit_distance=self.max_distance)
        return found[0].term if found else token

    def correct(self, text: str) -> str:
        tokens = text.split()
        corrected = [self.correct_token(token) for token in tokens]
        return text if corrected == tokens else " ".join(corrected)

    def correct_all(self, texts: Sequence[str]) -> list[str]:
        return [self.correct(t) if isinstance(t, str) else "" for t in texts]


def corrector_for(config: dict, vocabulary: Sequence[str], also_known: Iterable[str] = ()) -> SpellingCorrector | None:
    """The corrector an artifact's ``config`` asks for (``spelling_correction``), or None."""
    options = config.get("spelling_correction")
    return SpellingCorrector(vocabulary, **options, also_known=also_known) if options else None


def correction_config(max_distance: int) -> dict | None:
    """The ``spelling_correction`` config entry for a setting (0: no correction)."""
    return {"max_distance": max_distance, "min_length": MIN_WORD_LENGTH} if max_distance else None
