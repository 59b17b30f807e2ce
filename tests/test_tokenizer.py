"""Specification of tokenizer.py: the ids of Hugging Face's BERT tokenizer, everywhere.

The reference is transformers' pure-Python BERT tokenizer (`BertTokenizerLegacy` in transformers
5, `BertTokenizer` before), loaded from the same vocab.txt. The Rust ("fast") tokenizer must
agree on all the task data as well. It differs from the Python one on three corners that the data
never reaches (see tokenizer.py): a special token that only appears after cleaning, the Greek
final sigma, and which text loses the odd token when a pair is truncated.
"""
import csv

import pytest
import torch
import transformers

from tokenizer import BertTokenizer

MAX_LENGTH = 512  # what the data pipeline uses; it cuts one CFIMDB training review
SPLITS = ["train", "dev", "test-student"]
SINGLE_FILES = [f"ids-{task}-{split}.csv" for task in ["sst", "cfimdb"] for split in SPLITS]
PAIR_FILES = [f"{task}-{split}.csv" for task in ["quora", "sts"] for split in SPLITS]


def read_inputs(path):
    """(texts, pairs) of a data file: sentence and None, or sentence1 and sentence2."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if "sentence" in rows[0]:
        return [row["sentence"] for row in rows], [None] * len(rows)
    return [row["sentence1"] for row in rows], [row["sentence2"] for row in rows]


@pytest.fixture(scope="module")
def slow(checkpoint_dir):
    python_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    reference = python_class.from_pretrained(checkpoint_dir)
    assert not reference.is_fast
    return reference


@pytest.fixture(scope="module")
def fast(checkpoint_dir):
    reference = transformers.BertTokenizerFast.from_pretrained(checkpoint_dir)
    assert reference.is_fast
    return reference


def reference_encode(reference, texts, pairs=None, max_length=MAX_LENGTH):
    """(ids, token types) from a transformers tokenizer, as our encode_with_types returns them."""
    out = reference(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
    if isinstance(texts, str):
        return out["input_ids"], out["token_type_ids"]
    return list(zip(out["input_ids"], out["token_type_ids"]))


@pytest.fixture(scope="module")
def reference_encodings(data_dir, slow, fast):
    """Each data file encoded by both references, once per file: the Python one takes a while."""
    cache = {}

    def encodings(filename):
        if filename not in cache:
            texts, pairs = read_inputs(data_dir / filename)
            pairs_or_none = None if pairs[0] is None else pairs
            cache[filename] = {"texts": texts, "pairs": pairs, "python": reference_encode(slow, texts, pairs_or_none),
                               "rust": reference_encode(fast, texts, pairs_or_none)}
        return cache[filename]
    return encodings


def first_difference(ours, reference, texts, pairs):
    for i, (mine, theirs) in enumerate(zip(ours, reference)):
        if mine != theirs:
            return f"row {i}: {texts[i]!r} / {pairs[i]!r}\n  ours {mine}\n  reference {theirs}"
    return None


# --- every sentence and pair of the task data --------------------------------------------------

@pytest.mark.parametrize("filename", SINGLE_FILES + PAIR_FILES)
def test_every_data_row_gets_the_python_references_ids_and_types(tokenizer, reference_encodings, filename):
    ref = reference_encodings(filename)
    ours = [tokenizer.encode_with_types(t, p, MAX_LENGTH) for t, p in zip(ref["texts"], ref["pairs"])]
    assert ours == ref["python"], first_difference(ours, ref["python"], ref["texts"], ref["pairs"])


@pytest.mark.parametrize("filename", SINGLE_FILES + PAIR_FILES)
def test_every_data_row_gets_the_rust_references_ids_and_types(tokenizer, reference_encodings, filename):
    ref = reference_encodings(filename)
    ours = [tokenizer.encode_with_types(t, p, MAX_LENGTH) for t, p in zip(ref["texts"], ref["pairs"])]
    assert ours == ref["rust"], first_difference(ours, ref["rust"], ref["texts"], ref["pairs"])


# --- edge cases, each compared with the Python reference ---------------------------------------

EDGE_CASES = {
    "accents": "Naïve café, Åström über Ærø; ÉCOLE",
    "dotted capital I lower-cases to i + combining dot": "İstanbul",
    "greek final sigma": "ΟΔΟΣ Σ σοφός",
    "cjk ideographs are words, kana and hangul are not": "中文字符 and 日本語かな, 한국어",
    "emoji": "😀 emoji 👍🏽 ok❤️",
    "control characters are deleted, not spaces": "a\x0bb\x1fc\x7fd zero\u200bwidth soft\u00adhyphen",
    "nul and replacement character": "\x00nul\ufffd x\x00y \ufffd",
    "tabs and newlines": "tab\there\nnew\r\nline",
    "line separator splits words": "one\u2028two\u2029three",
    "empty": "",
    "whitespace only": " \t\n \u00a0 ",
    "no-break spaces": " 8 1\\/2 and 2\u00a01\\/2 \u2009thin\u3000wide",
    "treebank escapes": " -LRB- a film -RRB- `` quoted '' and \\/ slash -- ... 's n't",
    "ascii symbols are punctuation": "$5 ^caret `tick ~ | {} <br /> a@b.c",
    "unicode punctuation": "“smart quotes” — dash… ¿qué? «guillemets» ‘x’",
    "word over 100 characters": "a" * 101 + " fine " + "b" * 100 + " " + "é" * 101,
    "word WordPiece cannot cover": "ｆｕｌｌ width and ☃ snowman",
    "special tokens inside text": "hello [SEP] world",
    "special token alone": "[MASK]",
    "special tokens glued to words": "foo[SEP]bar [CLS][PAD] [[UNK]] x[MASK]",
    "lower-case special tokens are text": "[sep] [Mask] [ CLS ]",
    "special token revealed by cleaning": "[SE\x00P] [MA\u200bSK]",
}


RUST_DIFFERS = ["greek final sigma", "special token revealed by cleaning"]


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_python_reference_and_rust_where_it_agrees(tokenizer, slow, fast, case):
    text = EDGE_CASES[case]
    assert tokenizer.tokenize(text) == slow.tokenize(text)
    assert tokenizer.encode(text) == slow(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    rust_ids = fast(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert (tokenizer.encode(text) == rust_ids) == (case not in RUST_DIFFERS)


def test_edge_cases_as_pairs_match_python_reference(tokenizer, slow):
    texts = list(EDGE_CASES.values())
    for text, pair in zip(texts, texts[1:] + texts[:1]):
        assert tokenizer.encode_with_types(text, pair) == reference_encode(slow, text, pair)


def test_wordpiece_is_greedy_longest_match_first(tokenizer):
    # "una ##ff ##able" would spell it too, but after "una" the longest continuation is "##ffa"
    assert all(piece in tokenizer.vocab for piece in ["una", "##ff", "##able", "##ffa", "##ble"])
    assert tokenizer.tokenize("unaffable") == ["una", "##ffa", "##ble"]
    assert tokenizer.tokenize("tokenization") == ["token", "##ization"]


def test_long_single_text_is_cut_at_the_end(tokenizer, slow):
    text = " ".join(str(i) for i in range(100))
    ids = tokenizer.encode(text, max_length=20)
    assert len(ids) == 20 and ids[-1] == tokenizer.sep_token_id
    assert ids == slow(text, truncation=True, max_length=20)["input_ids"]


@pytest.mark.parametrize("len_a, len_b, max_length", [
    (40, 5, 30),   # only the longer text is cut, down to what fits
    (5, 40, 30),
    (40, 30, 30),  # both are cut: the longer down to the shorter, then the rest from both
    (30, 40, 30),
    (20, 20, 30),  # an odd number to remove: the extra token comes off the second text
    (20, 20, 31),
    (21, 20, 30),
])
def test_pairs_are_truncated_longest_first_as_the_python_reference_does(tokenizer, slow, len_a, len_b, max_length):
    a = " ".join(str(i) for i in range(len_a))
    b = " ".join(str(100 + i) for i in range(len_b))
    ids, types = tokenizer.encode_with_types(a, b, max_length=max_length)
    assert len(ids) == max_length
    assert (ids, types) == reference_encode(slow, a, b, max_length)


def test_max_length_too_small_for_special_tokens_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode("a b", "c", max_length=2)


def test_a_batch_with_no_texts_or_with_pairs_that_do_not_match_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no texts to encode"):
        tokenizer([])
    with pytest.raises(ValueError, match="got 2 texts but 1 pairs"):
        tokenizer(["a", "b"], ["c"])


# --- batches and decoding ------------------------------------------------------------------------

def test_batch_pads_like_the_python_reference(tokenizer, slow, data_dir):
    sst, _ = read_inputs(data_dir / "ids-sst-dev.csv")
    q1, q2 = read_inputs(data_dir / "quora-dev.csv")
    for texts, pairs in [(sst[:16], None), (q1[:16], q2[:16]), (["", "one", "two words"], None)]:
        ours = tokenizer(texts, pairs)
        ref = slow(texts, pairs, padding=True, truncation=True, max_length=MAX_LENGTH,
                   return_token_type_ids=True, return_attention_mask=True, return_tensors="pt")
        for key in ["input_ids", "token_type_ids", "attention_mask"]:
            assert ours[key].dtype == torch.long
            assert torch.equal(ours[key], ref[key]), key
        assert (ours["input_ids"][ours["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_batch_of_reviews_is_truncated_to_max_length_like_the_python_reference(tokenizer, slow, data_dir):
    reviews, _ = read_inputs(data_dir / "ids-cfimdb-dev.csv")
    ours = tokenizer(reviews[:8], max_length=128)
    ref = slow(reviews[:8], padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert ours["input_ids"].shape == (8, 128)
    assert torch.equal(ours["input_ids"], ref["input_ids"])


def test_decode_equals_python_reference_decode(tokenizer, slow, data_dir):
    texts = read_inputs(data_dir / "ids-sst-dev.csv")[0][:200] + read_inputs(data_dir / "quora-dev.csv")[0][:200]
    texts += list(EDGE_CASES.values())
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == slow.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == slow.decode(ids, skip_special_tokens=False)
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids)


# --- loading and the small API -------------------------------------------------------------------

def test_loads_from_folder_or_vocab_file(checkpoint_dir, tokenizer):
    from_file = BertTokenizer.from_pretrained(checkpoint_dir / "vocab.txt")
    assert from_file.vocab == tokenizer.vocab
    assert len(tokenizer) == 30522


def test_missing_vocab_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vocab.txt")):
        BertTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        BertTokenizer.from_pretrained(tmp_path / "nowhere.txt")


def test_special_token_ids_and_conversions_match_reference(tokenizer, slow):
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id) == \
        (slow.pad_token_id, slow.cls_token_id, slow.sep_token_id, slow.unk_token_id)
    assert len(tokenizer) == len(slow)
    tokens = ["[CLS]", "hello", "##ing", "not-a-token", "[SEP]"]
    assert tokenizer.convert_tokens_to_ids(tokens) == slow.convert_tokens_to_ids(tokens)
    assert tokenizer.convert_tokens_to_ids("hello") == slow.convert_tokens_to_ids("hello")
    ids = [101, 7592, 2075, 100, 102]
    assert tokenizer.convert_ids_to_tokens(ids) == slow.convert_ids_to_tokens(ids)
    assert tokenizer.convert_ids_to_tokens(7592) == "hello"
