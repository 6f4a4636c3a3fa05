import pytest

from engine.tokenizer import TextTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.model"
    assert train_tokenizer(path, 300) == str(path)
    return TextTokenizer(path)


def squash(text):
    return " ".join(text.lower().split())


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 300
    assert tok.sp.pad_id() == 3 and tok.sp.unk_id() == 0
    for special in (0, 1, 2, 3, 300, 10_000, -1):
        assert tok.piece(special) == ""
        assert tok.is_special(special)
    assert all(tok.piece(i) for i in range(4, 300))


def test_pieces_use_spaces_for_word_boundaries(tok):
    ids = tok.encode("the river")
    assert "".join(tok.piece(i) for i in ids) == " the river"
    assert all("\u2581" not in tok.piece(i) for i in range(300))


@pytest.mark.parametrize(
    "text",
    ["The old fisherman watched the frozen river.", "How far is the beach? Twelve, 42!",
     "Quick zebras jump over lazy dogs"],
)
def test_decode_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 300 for i in ids)
    assert squash(tok.decode(ids)) == squash(text)


def test_decode_skips_padding_and_specials(tok):
    ids = tok.encode("good morning")
    noisy = [3, 3, 0] + ids[:1] + [3, 0, 3] + ids[1:] + [3, 1, 2, 999]
    assert squash(tok.decode(noisy)) == "good morning"
    assert tok.decode([3, 0, 3]) == ""


@pytest.mark.parametrize("size", [64, 1000])
def test_vocab_size_is_exact(tmp_path, size):
    assert TextTokenizer(train_tokenizer(tmp_path / "t.model", size)).vocab_size == size


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError):
        train_tokenizer(tmp_path / "t.model", 10)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    from engine.config import CheckpointError
    with pytest.raises(CheckpointError, match="junk.model: not a sentencepiece model"):
        TextTokenizer(tmp_path / "junk.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.model"):
        TextTokenizer(tmp_path / "empty.model")
