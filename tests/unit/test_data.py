"""Contract tests for corpus sources, tokenisation and batching (pipeline/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.batching import (
    iterate_batches,
    length_bucketed_batches,
    num_batches,
    pack_sequences,
    pad_batch,
)
from pipeline.data.sources import (
    CorpusError,
    CorpusSplits,
    clean_lines,
    load_corpus,
    load_lm1b_mirror,
    load_text_files,
    read_text_file,
    split_train_validation,
)
from pipeline.data.tokenize import TokenizedSplit, tokenize_lines

CLS, SEP, PAD, UNK = 101, 102, 0, 100


def _shard(lm1b_dir: Path, i: int) -> Path:
    return lm1b_dir / f"news.en.heldout-{i:05d}-of-00050"


def _nonblank_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


@pytest.fixture(scope="module")
def test_shard_lines(lm1b_dir) -> list[str]:
    return _nonblank_lines(_shard(lm1b_dir, 13))


@pytest.fixture(scope="module")
def test_shard_split(test_shard_lines, tokenizer) -> TokenizedSplit:
    return tokenize_lines(test_shard_lines, tokenizer, max_seq_len=128)


def _tiny_split(lengths: list[int]) -> TokenizedSplit:
    """Sequences [CLS] 1000+k ... [SEP] with the given total lengths."""
    seqs = [np.array([CLS, *range(1000, 1000 + n - 2), SEP], dtype=np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return TokenizedSplit(ids=np.concatenate(seqs), offsets=offsets, word_counts=np.array(lengths, dtype=np.int32) - 2)


# ---------------------------------------------------------------- sources


def test_clean_lines_strips_whitespace_and_drops_empty_lines():
    assert clean_lines(["  a b \n", "", "   ", "\tc\r", "d"]) == ["a b", "c", "d"]


def test_read_text_file_keeps_line_order_without_newlines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\r\ntwo\n\nthree\n")
    assert read_text_file(path) == ["one", "two", "", "three"]


def test_undecodable_bytes_raise_corpus_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nanother fine line\nbad \xff\xfe bytes here\nlast\n")
    with pytest.raises(CorpusError) as info:
        read_text_file(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_missing_file_raises_corpus_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=r"nope.txt"):
        read_text_file(missing)


def test_missing_mirror_directory_raises_corpus_error_naming_it(tmp_path):
    missing = tmp_path / "no_lm1b_here"
    with pytest.raises(CorpusError, match="no_lm1b_here"):
        load_lm1b_mirror(missing)


def test_missing_shard_raises_corpus_error_naming_the_shard(tmp_path):
    (tmp_path / "news.en.heldout-00010-of-00050").write_text("a sentence\n")
    with pytest.raises(CorpusError, match=r"news.en.heldout-00013-of-00050"):
        load_lm1b_mirror(tmp_path, train_shards=(10,), test_shards=(13,))


def test_a_file_of_blank_lines_is_an_empty_corpus(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n\n")
    good = tmp_path / "good.txt"
    good.write_text("a real sentence .\n")
    with pytest.raises(CorpusError, match="corpus is empty") as info:
        load_corpus("text_files", train=[str(blank)], test=[str(good)])
    assert "text_files" in str(info.value) and "blank.txt" in str(info.value)
    with pytest.raises(CorpusError, match="corpus is empty"):
        load_corpus("text_files", train=[str(good)], test=[str(blank)])


def test_unknown_source_lists_the_valid_sources():
    with pytest.raises(CorpusError) as info:
        load_corpus("wikipedia")
    message = str(info.value)
    for name in ("lm1b_mirror", "lm1b_hub", "text_files", "hub"):
        assert name in message


def test_unknown_option_for_a_source_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="lm1b_mirror"):
        load_corpus("lm1b_mirror", mirror_dir=tmp_path, shards=(1,))


def test_validation_split_is_deterministic_disjoint_and_keeps_order():
    lines = [f"sentence {i}" for i in range(1000)]
    train, val = split_train_validation(lines, 0.1, seed=7)
    train2, val2 = split_train_validation(lines, 0.1, seed=7)
    assert (train, val) == (train2, val2)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(lines)
    assert train == sorted(train, key=lines.index) and val == sorted(val, key=lines.index)
    assert split_train_validation(lines, 0.1, seed=8)[1] != val


def test_a_positive_validation_fraction_gives_at_least_one_line():
    train, val = split_train_validation(["a", "b", "c"], 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    assert split_train_validation(["a", "b"], 0.0, seed=0) == (["a", "b"], [])


def test_mirror_train_and_validation_are_shards_10_to_12_and_test_is_shard_13(lm1b_dir):
    splits = load_lm1b_mirror(lm1b_dir, validation_fraction=0.02, seed=0)
    expected_train = [line for i in (10, 11, 12) for line in _nonblank_lines(_shard(lm1b_dir, i))]
    assert isinstance(splits, CorpusSplits)
    assert len(splits.train) + len(splits.validation) == len(expected_train) == 18202
    assert sorted(splits.train + splits.validation) == sorted(expected_train)
    assert len(splits.validation) == round(0.02 * len(expected_train))
    assert splits.test == _nonblank_lines(_shard(lm1b_dir, 13))


def test_max_sentences_caps_every_split_after_splitting(lm1b_dir):
    full = load_lm1b_mirror(lm1b_dir, validation_fraction=0.02, seed=3)
    capped = load_lm1b_mirror(lm1b_dir, validation_fraction=0.02, seed=3, max_sentences=50)
    assert capped.train == full.train[:50]
    assert capped.validation == full.validation[:50]
    assert capped.test == full.test[:50]


def test_text_files_expand_globs_and_read_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("b1\nb2\n")
    (tmp_path / "a.txt").write_text("a1\n\na2\n")
    (tmp_path / "test.dat").write_text("t1\n")
    splits = load_text_files(
        train=[str(tmp_path / "*.txt")], test=[str(tmp_path / "test.dat")], validation_fraction=0.0
    )
    assert splits.train == ["a1", "a2", "b1", "b2"]
    assert splits.validation == [] and splits.test == ["t1"]
    with pytest.raises(CorpusError, match="matches no file"):
        load_text_files(train=[str(tmp_path / "*.csv")], test=[str(tmp_path / "test.dat")])


def test_unreachable_hub_is_a_corpus_error_that_says_so(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="unreachable or offline") as info:
        load_corpus("lm1b_hub")
    assert "billion-word-benchmark/lm1b" in str(info.value)


def test_hub_datasets_split_by_row_and_cap_like_local_sources(monkeypatch):
    import datasets

    from pipeline.data import sources

    rows = {"train": [f"train {i}" for i in range(200)] + ["  "], "test": ["t1", "t2", "t3"]}
    fake = datasets.DatasetDict({name: datasets.Dataset.from_dict({"sentence": lines}) for name, lines in rows.items()})
    monkeypatch.setattr(sources, "_load_hub", lambda name, config, revision: fake)
    splits = load_corpus("hub", name="fake", text_column="sentence", validation_fraction=0.1, seed=4)
    local_train, local_val = split_train_validation(rows["train"], 0.1, seed=4)
    assert splits.train == clean_lines(local_train) and splits.validation == clean_lines(local_val)
    assert splits.test == rows["test"]
    capped = load_corpus("hub", name="fake", text_column="sentence", seed=4, max_sentences=2)
    assert len(capped.train) == len(capped.validation) == len(capped.test) == 2
    with pytest.raises(CorpusError, match="no column 'text'"):
        load_corpus("hub", name="fake")
    with pytest.raises(CorpusError, match="no split 'dev'"):
        load_corpus("hub", name="fake", text_column="sentence", validation_split="dev")


# ---------------------------------------------------------------- tokenisation


def test_tokenize_round_trip_decodes_to_the_lowercased_text(test_shard_lines, tokenizer):
    lines = [line for line in test_shard_lines if line.isascii()][:200]
    split = tokenize_lines(lines, tokenizer, max_seq_len=512, batch_size=64)
    assert len(split) == len(lines)
    checked = 0
    for i, line in enumerate(lines):
        seq = split[i]
        assert seq[0] == CLS and seq[-1] == SEP
        if UNK in seq:
            continue
        decoded = tokenizer.decode(seq.tolist(), skip_special_tokens=True)
        assert "".join(decoded.split()) == "".join(line.lower().split())
        checked += 1
    assert checked > 150


def test_tokenized_split_records_word_counts_and_dtypes(tokenizer):
    split = tokenize_lines(["it 's a test .", "two words"], tokenizer, max_seq_len=32)
    assert split.ids.dtype == np.int32 and split.offsets.dtype == np.int64
    assert split.word_counts.dtype == np.int32
    assert split.word_counts.tolist() == [5, 2]
    assert split.lengths.tolist() == [len(split[0]), len(split[1])]
    assert split.num_content_tokens == int(split.lengths.sum()) - 4


def test_a_line_over_max_seq_len_is_cut_at_a_word_boundary_and_counts_only_the_words_kept(tokenizer):
    """A cut line must not keep the word count of the whole raw line: the per-word bound would
    divide the NLL of a prefix by every word of the line."""
    long_line = " ".join(["internationalization"] * 30)  # several WordPieces per word
    split = tokenize_lines([long_line, "it 's short ."], tokenizer, max_seq_len=16)
    assert split.truncated.tolist() == [True, False] and split.num_truncated == 1
    seq = split[0].tolist()
    assert len(seq) <= 16 and seq[0] == CLS and seq[-1] == SEP
    kept_words = split.word_counts[0]
    assert 0 < kept_words < 30
    # exactly the first `kept_words` whole words, and the next one would not have fitted
    assert seq == tokenizer(" ".join(["internationalization"] * int(kept_words)))["input_ids"]
    assert len(tokenizer(" ".join(["internationalization"] * int(kept_words + 1)))["input_ids"]) > 16
    assert split.word_counts[1] == 4


def test_test_split_word_counts_match_the_scored_text(test_shard_lines, tokenizer):
    lines = [line for line in test_shard_lines if line.isascii()][:3000]
    split = tokenize_lines(lines, tokenizer, max_seq_len=64)
    assert split.num_truncated > 0  # LM1B has lines over 64 WordPieces
    for i in np.flatnonzero(split.truncated):
        words = lines[i].split()[: split.word_counts[i]]
        assert split[i].tolist() == tokenizer(" ".join(words))["input_ids"]
    whole = ~split.truncated
    assert split.word_counts[whole].tolist() == [len(line.split()) for line, w in zip(lines, whole) if w]


def test_length_cap_is_respected_and_sep_stays_last(test_shard_lines, tokenizer):
    split = tokenize_lines(test_shard_lines[:300], tokenizer, max_seq_len=16, batch_size=100)
    assert split.lengths.max() == 16
    for i in range(len(split)):
        assert split[i][0] == CLS and split[i][-1] == SEP
        assert (split[i][1:-1] != SEP).all()


@pytest.mark.parametrize("bad", [2, 513])
def test_max_seq_len_outside_the_model_range_is_rejected(tokenizer, bad):
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_lines(["a b c"], tokenizer, max_seq_len=bad)


def test_save_load_round_trip_and_byte_identical_rerun(test_shard_lines, tokenizer, tmp_path):
    split = tokenize_lines(test_shard_lines[:500], tokenizer, max_seq_len=64)
    split.save(tmp_path / "one")
    loaded = TokenizedSplit.load(tmp_path / "one")
    for name in ("ids", "offsets", "word_counts", "truncated"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(split, name))
        assert getattr(loaded, name).dtype == getattr(split, name).dtype
    tokenize_lines(test_shard_lines[:500], tokenizer, max_seq_len=64).save(tmp_path / "two")
    for name in ("ids.npy", "offsets.npy", "word_counts.npy", "truncated.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_loading_a_missing_split_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ids.npy"):
        TokenizedSplit.load(tmp_path / "nothing")


# ---------------------------------------------------------------- batching


def test_bucketed_batches_cover_every_index_exactly_once_and_are_deterministic(test_shard_split):
    lengths = test_shard_split.lengths
    batches = length_bucketed_batches(lengths, batch_size=32, seed=5, bucket_factor=10)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(lengths)))
    again = length_bucketed_batches(lengths, batch_size=32, seed=5, bucket_factor=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = length_bucketed_batches(lengths, batch_size=32, seed=6, bucket_factor=10)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_drop_last_keeps_only_full_batches():
    batches = length_bucketed_batches(np.arange(103) % 7, batch_size=10, seed=0, drop_last=True)
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)


def test_bucketing_reduces_padding_versus_random_batches(test_shard_split):
    lengths = test_shard_split.lengths

    def padded_area(bucket_factor: int) -> int:
        batches = length_bucketed_batches(lengths, 32, seed=0, bucket_factor=bucket_factor)
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    real = int(lengths.sum())
    bucketed_waste, random_waste = padded_area(50) - real, padded_area(1) - real
    assert bucketed_waste < 0.25 * random_waste


def test_pad_batch_pads_to_the_longest_with_a_matching_mask():
    ids, mask = pad_batch([np.array([101, 5, 102]), np.array([101, 102])], pad_id=PAD)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[101, 5, 102], [101, 102, PAD]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_packing_cuts_the_stream_into_full_rows(test_shard_split):
    rows = pack_sequences(test_shard_split, seq_len=128)
    assert rows.shape == (len(test_shard_split.ids) // 128, 128) and rows.dtype == np.int64
    np.testing.assert_array_equal(rows.reshape(-1), test_shard_split.ids[: rows.size])


def test_padded_epoch_sees_every_sequence_once_with_masks_matching_lengths():
    split = _tiny_split([5, 3, 9, 4, 4, 7, 3, 6, 8, 5])
    batches = list(iterate_batches(split, batch_size=3, seed=1, epoch=0, pad_id=PAD))
    assert len(batches) == num_batches(split, batch_size=3) == 4
    assert sum(int(b["attention_mask"].sum()) for b in batches) == len(split.ids)
    for b in batches:
        assert (b["input_ids"][~b["attention_mask"]] == PAD).all()
        assert (b["input_ids"][b["attention_mask"]] != PAD).all()


def test_start_batch_resumes_exactly_where_a_run_stopped(test_shard_split):
    kwargs = dict(batch_size=64, seed=3, epoch=2, pad_id=PAD)
    full = list(iterate_batches(test_shard_split, **kwargs))
    resumed = list(iterate_batches(test_shard_split, start_batch=7, **kwargs))
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_the_epoch_changes_the_batch_order(test_shard_split):
    first = next(iterate_batches(test_shard_split, 64, seed=3, epoch=0, pad_id=PAD))
    second = next(iterate_batches(test_shard_split, 64, seed=3, epoch=1, pad_id=PAD))
    assert not torch.equal(first["input_ids"][:, :5], second["input_ids"][:, :5])


def test_ranks_get_disjoint_equally_long_shares(test_shard_split):
    kwargs = dict(batch_size=50, seed=0, epoch=0, pad_id=PAD, world_size=2)
    share = [list(iterate_batches(test_shard_split, rank=r, **kwargs)) for r in (0, 1)]
    assert len(share[0]) == len(share[1]) == num_batches(test_shard_split, 50, world_size=2)
    firsts = [{tuple(b["input_ids"][:, :12].reshape(-1).tolist()) for b in s} for s in share]
    assert firsts[0].isdisjoint(firsts[1])


def test_packed_batches_are_full_rows_without_padding(test_shard_split):
    batches = list(iterate_batches(test_shard_split, 16, seed=0, epoch=0, pad_id=PAD, packed=True, seq_len=128))
    assert len(batches) == num_batches(test_shard_split, 16, packed=True, seq_len=128)
    assert all(b["input_ids"].shape[1] == 128 and b["attention_mask"].all() for b in batches)
    total_rows = sum(b["input_ids"].shape[0] for b in batches)
    assert total_rows == len(test_shard_split.ids) // 128
