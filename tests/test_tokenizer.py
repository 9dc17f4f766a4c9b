"""Our BPE tokenizer against fixed check vectors and against OpenAI's tokenizer on a few hundred strings."""
import hashlib
import random

import pytest
import torch

import clip_model

CHECKS = [  # (text, ids without padding); agreed by openai/CLIP and open_clip
    ("a photo of a dog.", [320, 1125, 539, 320, 1929, 269]),
    ("A centered satellite photo of Annual Crop Land.", [320, 24584, 10316, 1125, 539, 2906, 9955, 973, 269]),
    ("X X X X banded texture.", [343, 343, 343, 343, 37804, 16505, 269]),
    ("Hello,\tWORLD!!  ", [3306, 267, 1002, 748]),
    ("don't stop\u2014it's 3.14!", [847, 713, 1691, 2005, 585, 568, 274, 269, 272, 275, 256]),
    ("&amp;lt;3 &quot;ok&quot;", [283, 274, 257, 2481, 257]),
    ("\ufb01ve \U0001f436 dogs", [3127, 10631, 3255]),
    ("\u201chi\u201d", [257, 1883, 257]),
    ("", []),
]

WORDS = ["dog", "Cat", "école", "naïve", "café", "Straße", "東京", "日本語", "🐶", "🚀🔥", "&amp;", "&lt;b&gt;",
         "&amp;quot;", "“quoted”", "‘single’", "don't", "we'll", "I'M", "they'd", "3.14159", "1,000,000", "42nd",
         "!!!", "?!", "...", "—", "–", "ﬁ", "ﬂower", "e\u0301", "n\u0303", "\u00a0", "\t", "\n", "   ", "ÅNGSTRÖM",
         "Ελληνικά", "русский", "العربية", "हिन्दी", "한국어", "<|endoftext|>", "x-ray", "e-mail", "C++", "#hashtag",
         "@user", "http://example.com/a?b=c", "½", "²", "Ⅻ", "🇫🇷", "👨‍👩‍👧", "a_b", "snake_case", "(parens)",
         "[brackets]"]


def _strings():
    rng = random.Random(0)
    texts = [w for w in WORDS] + [t for t, _ in CHECKS]
    while len(texts) < 300:
        texts.append(rng.choice([" ", "", "  ", "\t"]).join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
    texts += [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(5)]  # truncated at 77
    return texts


@pytest.mark.parametrize("text,ids", CHECKS)
def test_check_vectors(text, ids):
    tokens = clip_model.tokenize(text)
    expected = torch.zeros(1, 77, dtype=torch.long)
    expected[0, :len(ids) + 2] = torch.tensor([49406, *ids, 49407])
    assert torch.equal(tokens, expected)


def test_truncation_keeps_eot_last():
    tokens = clip_model.tokenize("dog " * 100, truncate=True)
    assert tokens[0, 0] == 49406 and tokens[0, 76] == 49407 and (tokens[0, 1:76] == 1929).all()
    assert tokens.argmax(-1).item() == 76
    with pytest.raises(ValueError, match="truncate=True"):
        clip_model.tokenize("dog " * 100)


def test_identical_to_reference_tokenizer():
    clip = pytest.importorskip("clip")
    texts = _strings()
    assert len(texts) >= 300
    expected = clip.tokenize(texts, truncate=True)
    got = clip_model.tokenize(texts, truncate=True)
    mismatched = [t for t, a, b in zip(texts, got, expected) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:5]
    assert got.dtype == torch.long and got.shape == (len(texts), 77)


def test_vocab_file_is_openais():
    data = clip_model.VOCAB.read_bytes()
    assert len(data) == 1_356_917
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_missing_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(clip_model.LoadError, match="nope.txt.gz is missing: copy it"):
        clip_model.Tokenizer(tmp_path / "nope.txt.gz")


def test_decode_inverts_encode_up_to_spacing():
    tokenizer = clip_model._tokenizer()
    for text, decoded in [("a photo of a dog.", "a photo of a dog ."), ("Ünïcödé Café", "ünïcödé café"),
                          ("sea_lion", "sea _ lion")]:
        assert tokenizer.decode(tokenizer.encode(text)) == decoded
    assert tokenizer.decode([49406, 49407]) == "<|startoftext|><|endoftext|>"
