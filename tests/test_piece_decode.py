"""ChatTokenizer.decode_piece's Rust shortcut gives the text of the tokenizer's own decode, or is not taken.

Streamed tokens are decoded straight by the Rust tokenizer where transformers' ``decode`` would only pass the
ids there. Each check compares that with the full ``decode`` call over thousands of random id windows, special
and added tokens mixed in, on every tokenizer family that builds offline: SmolLM2's real byte-level BPE, a
Llama-style SentencePiece BPE with byte fallback, a Unigram (Metaspace) and a WordPiece.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.models import smollm2_tokenizer
from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld, naïve café 日本語", "  spaces\n\nand\ttabs",
          "def f(x):\n    return x + 1", "a<b>{c}[d] </answer> User:", "Numbers 12345 and 3.14159"] * 20
TEXTS = ["héllo wörld ", "日本語のテキスト", "emoji 😀🎉 ok", "  spaces\n\n", "a<b>{c}", " User: <think>", "<x> sp r "]


def _wrap(tk: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over ``tk`` with added tokens of every kind (special or not, stripping, normalized)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken(" sp", lstrip=True), AddedToken("r ", rstrip=True),
                    AddedToken("<norm>", normalized=True)])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_end|>", special=True),
                                                          AddedToken("<x>", special=False)]})
    return tok


def _llama_like() -> PreTrainedTokenizerFast:
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tk.train_from_iterator(CORPUS, trainer)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    # byte fallback reads the byte pieces as vocabulary entries: they must not stay added (special) tokens
    spec = json.loads(tk.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]
    return _wrap(Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                           unk_token="<unk>"))
    return _wrap(tk, eos_token="</s>", unk_token="<unk>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()  # cleans up spaces itself, in Rust: both paths do it
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]", "[CLS]"])
    tk.train_from_iterator(CORPUS, trainer)
    return _wrap(tk, unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]")


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()  # ~20 s from the GGUF here: loaded once, copied where changed


def _smollm2_added(smollm2) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(smollm2)
    tok.add_tokens([AddedToken("<think>", special=False)])
    return tok


FAMILIES = {"smollm2": lambda smollm2: smollm2, "smollm2+added": _smollm2_added,
            "llama-byte-fallback": lambda _: _llama_like(), "unigram": lambda _: _unigram(),
            "wordpiece": lambda _: _wordpiece()}


def _full(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _windows(tok, rng, count):
    """Random id windows, a third of their ids special or added, and windows of real text with such ids mixed in."""
    marked = sorted({*tok.all_special_ids, *tok.added_tokens_decoder})
    for n in range(count):
        if n % 2:
            yield [rng.choice(marked) if rng.random() < 0.3 else rng.randrange(len(tok))
                   for _ in range(rng.randrange(7))]
        else:
            ids = tok.encode(rng.choice(TEXTS), add_special_tokens=False)
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(marked))
            start = rng.randrange(len(ids))
            yield ids[start:start + rng.randrange(1, 6)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rust_piece_decode_matches_the_tokenizers_decode(family, smollm2):
    tok = FAMILIES[family](smollm2)
    chat = ChatTokenizer(tok, family)
    assert chat.decode_piece([]) == ""
    assert chat._rust_decode is not None  # the shortcut is taken for every plain fast tokenizer
    rng = random.Random(family)
    for ids in _windows(tok, rng, 3000):
        assert chat.decode_piece(ids) == _full(tok, ids), ids


def test_streamed_pieces_skip_the_python_decode(monkeypatch, smollm2):
    tok = smollm2
    chat = ChatTokenizer(tok, "m")
    ids = tok.encode(" the cat sat on the mat", add_special_tokens=False)
    want = [_full(tok, ids[i:i + 2]) for i in range(len(ids) - 1)]
    calls = []  # (the shortcut was checked with the full decode at load: not by the first streamed piece)
    full = type(tok).decode
    monkeypatch.setattr(type(tok), "decode", lambda self, *a, **k: calls.append(a) or full(self, *a, **k))
    assert [chat.decode_piece(ids[i:i + 2]) for i in range(len(ids) - 1)] == want
    assert calls == []
    assert chat.decode_piece(tuple(ids[:2])) == want[0] and len(calls) == 1  # not a list: decode converts it


def test_a_tokenizer_that_decodes_its_own_way_keeps_its_decode():
    class OwnDecode(PreTrainedTokenizerFast):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "|".join(self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens))

    tok = _wordpiece()
    own = OwnDecode(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]")
    replaced = _wordpiece()
    replaced.decode = lambda ids, **kwargs: "replaced"
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    for t in (own, replaced):
        chat = ChatTokenizer(t, "m")
        assert chat.decode_piece(ids) == _full(t, ids) != tok.decode(ids)
        assert chat._rust_decode is None


def test_a_python_tokenizer_keeps_its_decode():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    chat = ChatTokenizer(tok, "m")
    ids = tok.encode("héllo </s> wörld", add_special_tokens=True)
    assert chat.decode_piece(ids) == _full(tok, ids)
    assert chat._rust_decode is None
