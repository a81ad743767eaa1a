"""StopChecker: length before EOS, EOS, stop strings split across tokens, long outputs."""

from __future__ import annotations

from genserve.engine.request import FinishReason
from genserve.sampling.params import StoppingParams
from genserve.sampling.stopping import StopChecker

EOS = 2


def feed(checker: StopChecker, pieces: list[str], token: int = 10) -> list[FinishReason | None]:
    return [checker(token, piece) for piece in pieces]


def test_length_is_checked_before_eos():
    checker = StopChecker(StoppingParams(max_new_tokens=3), {EOS})
    assert checker(5, "a") is None
    assert checker(6, "b") is None
    assert checker(EOS, "</s>") is FinishReason.LENGTH
    assert checker.num_generated == 3


def test_eos_and_ignore_eos():
    assert StopChecker(StoppingParams(max_new_tokens=10), {EOS, 7})(7, "") is FinishReason.EOS_TOKEN
    ignoring = StopChecker(StoppingParams(max_new_tokens=2, ignore_eos=True), {EOS})
    assert ignoring(EOS, "</s>") is None
    assert ignoring(EOS, "</s>") is FinishReason.LENGTH


def test_max_new_tokens_one():
    assert StopChecker(StoppingParams(max_new_tokens=1), set())(5, "x") is FinishReason.LENGTH


def test_stop_sequence_in_one_piece_and_split_across_pieces():
    checker = StopChecker(StoppingParams(max_new_tokens=100, stop_sequences=["###"]), {EOS})
    assert feed(checker, ["Hello", " #", "#"]) == [None, None, None]
    assert checker(10, "# done") is FinishReason.STOP_SEQUENCE
    assert checker.stop_sequence == "###"

    split = StopChecker(StoppingParams(max_new_tokens=100, stop_sequences=["User:"]), {EOS})
    assert feed(split, ["Sure", ".\n", "U", "", "se", "r"]) == [None] * 6
    assert split(10, ":") is FinishReason.STOP_SEQUENCE


def test_stop_sequence_inside_a_piece_not_only_at_its_end():
    checker = StopChecker(StoppingParams(max_new_tokens=100, stop_sequences=["."]), set())
    assert checker(10, "Hi") is None
    assert checker(10, ".)") is FinishReason.STOP_SEQUENCE


def test_several_stop_sequences_and_empty_ones_ignored():
    stopping = StoppingParams(max_new_tokens=100, stop_sequences=["", "END", "\n\n"])
    checker = StopChecker(stopping, set())
    assert feed(checker, ["a", "\n", "b"]) == [None, None, None]
    assert checker(10, "\n\n") is FinishReason.STOP_SEQUENCE
    assert checker.stop_sequence == "\n\n"


def test_unicode_stop_sequence_split():
    checker = StopChecker(StoppingParams(max_new_tokens=100, stop_sequences=["世界🤖"]), set())
    assert feed(checker, ["你好", "世", "", "界"]) == [None] * 4
    assert checker(10, "🤖!") is FinishReason.STOP_SEQUENCE


def test_long_output_keeps_a_bounded_tail_and_still_matches_split_stops():
    checker = StopChecker(StoppingParams(max_new_tokens=100_000, stop_sequences=["<stop>"]), set())
    for _ in range(5_000):
        assert checker(10, "lorem ipsum ") is None
        assert len(checker._tail) <= 300
    assert feed(checker, ["<st", "o"]) == [None, None]
    assert checker(10, "p> trailing") is FinishReason.STOP_SEQUENCE


def test_stop_sequence_longer_than_the_kept_tail():
    stop = "".join(chr(ord("a") + i % 26) for i in range(450))
    checker = StopChecker(StoppingParams(max_new_tokens=100_000, stop_sequences=[stop]), set())
    for _ in range(100):
        assert checker(10, "x" * 37) is None
    pieces = [stop[i : i + 7] for i in range(0, len(stop), 7)]
    results = feed(checker, pieces)
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] is FinishReason.STOP_SEQUENCE
    assert len(checker._tail) >= len(stop)


def test_no_match_across_unrelated_text():
    checker = StopChecker(StoppingParams(max_new_tokens=100, stop_sequences=["abc"]), set())
    assert feed(checker, ["ab", "x", "c", "a", "b"]) == [None] * 5
    assert checker(10, "c") is FinishReason.STOP_SEQUENCE
