"""BERT's uncased WordPiece tokenizer (Devlin et al. 2019), written out by hand.

It follows Google's original tokenization.py and gives the same ids as Hugging Face's pure-Python
`BertTokenizer` (named `BertTokenizerLegacy` in transformers 5) on every sentence and pair of the
task data; tests/test_tokenizer.py checks this. Text becomes ids in three steps:

1. Special tokens. "[CLS]", "[SEP]", "[PAD]", "[MASK]" and "[UNK]" written in the text are cut
   out first. The match is case-sensitive and works inside a word: "foo[SEP]bar" gives foo [SEP]
   bar, but "[sep]" is ordinary text and gives "[", "sep", "]".
2. Basic tokenisation of the text between them: delete NUL, U+FFFD and control characters and
   turn all other whitespace into spaces; put spaces around CJK ideographs (Chinese has no spaces
   between words, so each ideograph is a word of its own; kana and Hangul are other Unicode
   blocks and are left alone); NFC-normalise; split on whitespace; lower-case; strip accents;
   make every punctuation character a word of its own. Punctuation here means every Unicode P*
   character and every ASCII character that is not a letter or digit, so `$`, `^` and "`" count,
   even though Unicode calls them symbols.
3. WordPiece (Wu et al. 2016): split each word into vocabulary entries, marking every piece after
   the first with "##", e.g. "tokenization" -> token ##ization.

Subtle points:
- Accents are stripped by NFD decomposition followed by dropping the combining marks (category
  Mn). NFD writes "é" as "e" + U+0301 (combining acute), so dropping the mark leaves the bare
  letter; the uncased vocabulary was built from text treated this way. The order matters:
  lower-casing can itself produce marks ("İ".lower() is "i" + U+0307), which stripping removes.
- WordPiece is greedy: at each position it takes the longest vocabulary entry and never goes back,
  so "unaffable" -> una ##ffa ##ble, although una ##ff ##able is in the vocabulary too. Greedy is
  not always the most natural split, or the one with the fewest pieces, but it is how the model's
  training text was split, and any other split would show the model sequences it never saw. If the greedy walk gets
  stuck, the whole word becomes a single [UNK], not only the part that failed. A word longer
  than 100 characters also becomes [UNK].
- Lower-casing is Python's str.lower(), which writes a capital sigma at the end of a word as the
  final form "ς"; the Rust ("fast") tokenizer writes "σ" everywhere.
- A special token that only appears once the text is cleaned ("[SE\\x00P]" -> "[SEP]") is still
  kept whole. The Python reference does this; the Rust tokenizer splits it. No task
  sentence contains one.
- Pairs are truncated longest-first, by the Python reference's rule: cut the longer text down to
  the length of the shorter, then take the rest from both texts equally, with the odd token taken
  from the second text. The Rust tokenizer keeps the odd token in the longer text instead, so
  the two differ only there.

Speed: every step after the whitespace split works on one word at a time, so the ids of each word
are cached. Lower-casing, accent stripping and WordPiece run once per distinct word. Pure-ASCII
text, almost all of the task data, skips the per-character cleaning, the CJK spacing and NFC,
because none of them can change ASCII text.
"""
import functools
import re
import unicodedata
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # a longer word is [UNK] without trying WordPiece
WORD_CACHE_SIZE = 1 << 20  # distinct words whose ids are kept; the task data has ~10^5

# no special token is a prefix of another, so a plain alternation finds them as transformers does
SPECIAL_TOKEN_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

# ASCII cleaning in one str.translate: delete control characters, tab/newline/CR become spaces
ASCII_CLEANUP = {cp: None for cp in [*range(32), 127]} | {ord(c): " " for c in "\t\n\r"}

# the CJK Unified Ideographs blocks and their extensions and compatibility blocks
CJK_RANGES = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
CJK_RE = re.compile("([" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES) + "])")

# decode() undoes the spaces that tokenisation put before punctuation and English clitics
DECODE_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


# --- basic tokenisation -----------------------------------------------------------------------

def is_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char):
    """Unicode C* (control, format, private use, unassigned), except tab, newline and CR."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_punctuation(char):
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def clean_text(text):
    """Delete NUL, U+FFFD and control characters; turn every whitespace character into a space."""
    if text.isascii():
        return text.translate(ASCII_CLEANUP)
    return "".join(" " if is_whitespace(c) else c for c in text
                   if c not in "\x00\ufffd" and not is_control(c))


def split_words(text):
    """The whitespace-separated words of `text` after cleaning, CJK spacing and NFC."""
    text = clean_text(text)
    if not text.isascii():
        text = CJK_RE.sub(r" \1 ", text)
        text = unicodedata.normalize("NFC", text)
    return text.split()


def strip_accents(word):
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def split_on_punctuation(word):
    """'can't!' -> ['can', "'", 't', '!']"""
    parts, start = [], 0
    for i, char in enumerate(word):
        if is_punctuation(char):
            if start < i:
                parts.append(word[start:i])
            parts.append(char)
            start = i + 1
    if start < len(word):
        parts.append(word[start:])
    return parts


# --- WordPiece ---------------------------------------------------------------------------------

def wordpiece(word, vocab):
    """Split one word into vocabulary entries, greedily longest-first; ['[UNK]'] if that fails."""
    if len(word) > MAX_WORD_CHARS:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
        else:  # not even one character matched: give up on the whole word
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


def truncate_longest_first(a, b, budget):
    """Cut ids `a` (and `b`, if given) to `budget` tokens in all, as transformers' Python code does."""
    if b is None:
        return a[:budget], None
    excess = len(a) + len(b) - budget
    if excess <= 0:
        return a, b
    uneven = min(abs(len(a) - len(b)), excess)  # first the longer one down to the shorter's length,
    even = excess - uneven  # then the rest from both, the odd token from b
    cut_a = even // 2 + (uneven if len(a) > len(b) else 0)
    cut_b = even - even // 2 + (0 if len(a) > len(b) else uneven)
    return a[:len(a) - cut_a], b[:len(b) - cut_b]


# --- the tokenizer -----------------------------------------------------------------------------

class BertTokenizer:
    """Uncased BERT tokenizer over a vocab.txt: text -> ids with [CLS]/[SEP], batches, decode."""

    def __init__(self, vocab):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}: is it a BERT vocab.txt?")
        self.vocab = vocab
        self.ids_to_tokens = {i: token for token, i in vocab.items()}
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, \
            self.mask_token_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = {vocab[t] for t in SPECIAL_TOKENS}
        self.word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._word_ids)

    @classmethod
    def from_pretrained(cls, path):
        """`path` is a checkpoint folder holding vocab.txt, or the vocab file itself."""
        path = Path(path)
        vocab_file = path / "vocab.txt" if path.is_dir() else path
        if not vocab_file.is_file():
            raise FileNotFoundError(f"no BERT vocabulary at {vocab_file}: pass a checkpoint folder "
                                    "holding vocab.txt, or the vocab.txt file itself")
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        return cls({token: i for i, token in enumerate(tokens)})

    def __len__(self):
        return len(self.vocab)

    def _word_ids(self, word):
        """Ids of one whitespace-separated word: lower-case, strip accents, split punctuation, WordPiece."""
        if word in SPECIAL_TOKENS:
            return (self.vocab[word],)
        word = word.lower()
        if not word.isascii():
            word = strip_accents(word)
        return tuple(self.vocab[piece] for part in split_on_punctuation(word)
                     for piece in wordpiece(part, self.vocab))

    def text_ids(self, text):
        """Ids of `text` without [CLS]/[SEP] and without truncation."""
        ids = []
        for chunk in SPECIAL_TOKEN_RE.split(text) if "[" in text else [text]:
            if chunk in SPECIAL_TOKENS:
                ids.append(self.vocab[chunk])
                continue
            for word in split_words(chunk):
                ids += self.word_ids(word)
        return ids

    def tokenize(self, text):
        return self.convert_ids_to_tokens(self.text_ids(text))

    def encode_with_types(self, text, pair=None, max_length=512):
        """([CLS] text [SEP] (pair [SEP]), token types 0 for text and 1 for pair), truncated."""
        n_special = 2 if pair is None else 3
        if max_length < n_special:
            raise ValueError(f"max_length={max_length} leaves no room for the {n_special} special tokens")
        a = self.text_ids(text)
        b = None if pair is None else self.text_ids(pair)
        a, b = truncate_longest_first(a, b, max_length - n_special)
        ids = [self.cls_token_id, *a, self.sep_token_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_token_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode(self, text, pair=None, max_length=512):
        return self.encode_with_types(text, pair, max_length)[0]

    def __call__(self, texts, pairs=None, max_length=512):
        """Encode a batch, padded to its longest sequence: dict of (batch, length) LongTensors."""
        if isinstance(texts, str):
            texts, pairs = [texts], None if pairs is None else [pairs]
        if not texts:
            raise ValueError("no texts to encode: pass a non-empty list of strings")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs: they must match")
        encoded = [self.encode_with_types(text, None if pairs is None else pairs[i], max_length)
                   for i, text in enumerate(texts)]
        longest = max(len(ids) for ids, _ in encoded)
        padding = [longest - len(ids) for ids, _ in encoded]
        return {
            "input_ids": torch.tensor([ids + [self.pad_token_id] * p
                                       for (ids, _), p in zip(encoded, padding)]),
            "token_type_ids": torch.tensor([types + [0] * p for (_, types), p in zip(encoded, padding)]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * p
                                            for (ids, _), p in zip(encoded, padding)]),
        }

    def decode(self, ids, skip_special_tokens=True):
        """Ids back to text: pieces joined, '##' glued on, spaces before punctuation removed."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        text = " ".join(self.convert_ids_to_tokens(ids)).replace(" ##", "").strip()
        for spaced, joined in DECODE_CLEANUP:
            text = text.replace(spaced, joined)
        return text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.ids_to_tokens.get(ids, "[UNK]")
        return [self.ids_to_tokens.get(i, "[UNK]") for i in ids]
