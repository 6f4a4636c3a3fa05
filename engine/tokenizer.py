"""Text tokenizer: Moshi's sentencepiece model, plus a tiny trainable one for tests."""

from __future__ import annotations

import io
import os
import random

import sentencepiece as spm

from engine.config import CheckpointError

# Moshi emits id 3 on text steps with no new word and id 0 between words; neither
# carries text.
SPECIAL_IDS = frozenset({0, 3})


class TextTokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: not a sentencepiece model the text tokenizer can load ({e}); "
                                  "check config.json's tokenizer_name or --tokenizer") from None
        self.vocab_size = self.sp.GetPieceSize()
        # Decoding runs once per generated text token per session, so the piece strings
        # and the special-id set are resolved up front.
        self._special = {
            i
            for i in range(self.vocab_size)
            if i in SPECIAL_IDS
            or self.sp.IsControl(i)
            or self.sp.IsUnknown(i)
            or self.sp.IsUnused(i)
        }
        self._pieces = [self._text_of(i) for i in range(self.vocab_size)]

    def _text_of(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        if self.sp.IsByte(token_id):
            # Byte-fallback pieces look like "<0x41>"; only ASCII bytes are text alone.
            value = int(self.sp.IdToPiece(token_id)[3:5], 16)
            return chr(value) if value < 0x80 else ""
        return self.sp.IdToPiece(token_id).replace("\u2581", " ")

    def is_special(self, token_id: int) -> bool:
        return not 0 <= token_id < self.vocab_size or token_id in self._special

    def piece(self, token_id: int) -> str:
        """Text of one token, with word boundaries as spaces; '' for special tokens."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            return ""
        return self._pieces[token_id]

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        """Text of a token sequence, skipping special tokens."""
        kept = [int(i) for i in ids if not self.is_special(int(i))]
        return self.sp.DecodeIds(kept)


_NOUNS = """
time year people way day man woman child world life hand part eye place week case point
government company number group problem fact house water money story night month lot
book job word business issue side kind head friend father mother power hour game line
member city community name president team minute idea kid body information school face
others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education foot boy age policy music
market sense nation plan college interest death experience effect class control care
field development role effort rate heart drug show leader light voice wife police mind
price report decision son view relationship town road arm difference thing value
building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need
court oil situation cost industry figure street image phone data picture practice piece
land product doctor wall patient worker news test movie north love support technology
step baby computer type attention film tree source organization hair window evidence
population site dinner animal garden river mountain island forest ocean bridge village
kitchen station letter engine planet forest winter summer autumn spring weather storm
""".split()
_VERBS = """
ask work seem feel try leave call need keep start help talk turn show play move live
believe bring happen write provide sit stand lose pay meet include continue learn lead
understand watch follow stop create speak read spend grow open walk win offer remember
consider appear wait serve die send expect build stay fall reach kill remain suggest
raise pass report decide pull return explain hope develop carry break receive agree
support hit produce eat cover catch draw choose cause point listen travel visit paint
answer clean jump laugh smile cook dance climb repair borrow discover imagine measure
""".split()
_ADJECTIVES = """
good new first last long great little own other old right big high different small
large next early young important few public bad same able political late general full
special easy clear recent certain personal open red difficult available likely short
single medical current wrong private past foreign fine common poor natural significant
similar hot dead central happy serious ready simple left physical general quiet strange
gentle bright ancient frozen silver golden wooden famous curious lonely tired busy empty
""".split()
_ADVERBS = """
quickly slowly carefully quietly suddenly finally usually really almost always never
often sometimes together already perhaps certainly probably clearly simply recently
""".split()
_LINKS = """
in on at near under over behind beside through across after before during without with
for from into toward around between against along
""".split()
_QUESTION_WORDS = ["why", "when", "how", "where", "so", "and", "but", "then", "yes", "no"]
_NUMBERS = """
one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty
hundred thousand million
""".split()


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("e") and not word.endswith("ee") else word


def _verb(rng: random.Random) -> str:
    v = rng.choice(_VERBS)
    if rng.random() < 0.15:
        v = "re" + v
    return rng.choice([v, v + ("es" if v.endswith(("s", "ch", "sh")) else "s"),
                       _stem(v) + "ed", _stem(v) + "ing"])


def _adjective(rng: random.Random) -> str:
    a = rng.choice(_ADJECTIVES)
    if rng.random() < 0.1:
        a = "un" + a
    # Derived forms give sentencepiece reusable morphemes to learn beyond whole words.
    return rng.choice([a, a, a, _stem(a) + "er", _stem(a) + "est", a + "ness"])


def _noun(rng: random.Random) -> str:
    n = rng.choice(_NOUNS)
    r = rng.random()
    if r < 0.1:
        return rng.choice(_VERBS) + "er"
    if r < 0.2:
        return n + rng.choice(["less", "ful", "like", "ish"])
    return n + ("s" if r < 0.45 else "")


def _phrase(rng: random.Random) -> str:
    words = [rng.choice(["the", "a", "my", "our", "their", "this", "every", "some"])]
    if rng.random() < 0.6:
        words.append(_adjective(rng))
    if rng.random() < 0.2:
        words.append(rng.choice(_NUMBERS + [str(rng.randint(0, 2000))]))
    words.append(_noun(rng))
    return " ".join(words)


def _corpus(seed: int = 1234, sentences: int = 3000) -> list[str]:
    """Deterministic varied English text, enough to support about a thousand pieces."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        parts = [_phrase(rng), _verb(rng), _phrase(rng)]
        if rng.random() < 0.5:
            parts += [rng.choice(_LINKS), _phrase(rng)]
        if rng.random() < 0.4:
            parts.append(rng.choice(_ADVERBS))
        if rng.random() < 0.1:
            parts.insert(0, rng.choice(_QUESTION_WORDS))
        end = rng.choice([".", ".", ".", "?", "!", ","])
        lines.append(" ".join(parts) + end)
    return lines


def train_tokenizer(path: str | os.PathLike, vocab_size: int) -> str:
    """Trains a small unigram sentencepiece model with exactly `vocab_size` pieces.

    Ids 0-3 are unk, bos, eos and pad, matching the specials of Moshi's tokenizer.
    Text is case-folded so that tiny vocabularies still cover arbitrary English input.
    """
    if not 64 <= vocab_size <= 1000:
        raise ValueError(f"vocab_size must be in [64, 1000], got {vocab_size}")
    path = os.fspath(path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    size = TextTokenizer(path).vocab_size
    if size != vocab_size:
        raise RuntimeError(f"trained tokenizer has {size} pieces, expected {vocab_size}")
    return path
