from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vibee.runtime.stop_strings import StopStringMatcher


def expected_output(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """The whole-text answer: cut at the earliest-starting stop string (shortest on a tie)."""
    hits = [(text.find(s), len(s), s) for s in stop if s in text]
    if not hits:
        return text, None
    at, _, s = min(hits)
    return text[:at] + (s if include else ""), s


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# A small alphabet so stop strings actually occur, overlap and share prefixes.
alphabet = st.sampled_from("ab c\n")
texts = st.text(alphabet, max_size=40)
stops = st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=texts, stop=stops, cuts=st.lists(st.integers(0, 60), max_size=12), include=st.booleans())
def test_streamed_output_equals_whole_text_answer(text, stop, cuts, include):
    deltas = split(text, cuts)
    assert "".join(deltas) == text
    want, want_stop = expected_output(text, stop, include)
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)

    emitted, fed = "", ""
    for d in deltas:
        out, stopped = matcher.feed(d)
        fed += d
        emitted += out
        # Nothing emitted may later turn out to be (part of) a stop string.
        assert want.startswith(emitted)
        if stopped is not None:
            break
        # Held-back text stays shorter than the longest stop string.
        assert len(fed) - len(emitted) < max(map(len, stop))
    else:
        emitted += matcher.flush()
    assert emitted == want
    assert matcher.stopped == want_stop


@settings(max_examples=200, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 60), max_size=12))
def test_no_stop_strings_passes_everything_through(text, cuts):
    matcher = StopStringMatcher([])
    outs = [matcher.feed(d) for d in split(text, cuts)]
    assert all(stopped is None for _, stopped in outs)
    assert [o for o, _ in outs] == split(text, cuts)  # nothing held back at all
    assert matcher.flush() == ""


def test_stop_string_spanning_deltas_is_held_then_removed():
    m = StopStringMatcher(["</end>"])
    assert m.feed("Hello </") == ("Hello ", None)
    assert m.held == "</"
    assert m.feed("en") == ("", None)
    assert m.feed("d> trailing") == ("", "</end>")
    assert m.stopped == "</end>"
    assert m.feed("more") == ("", None)  # ignored after the stop


def test_include_stop_str_in_output():
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert m.feed("abST") == ("ab", None)
    assert m.feed("OPxyz") == ("STOP", "STOP")


def test_false_start_is_released():
    m = StopStringMatcher(["</end>"])
    assert m.feed("a </e") == ("a ", None)
    assert m.feed("x") == ("</ex", None)
    assert m.flush() == ""
    assert m.stopped is None


def test_flush_returns_held_tail():
    m = StopStringMatcher(["###"])
    assert m.feed("done ##") == ("done ", None)
    assert m.flush() == "##"
    assert m.stopped is None


def test_earliest_start_wins_over_first_listed():
    m = StopStringMatcher(["world", "lo"])
    assert m.feed("hello world") == ("hel", "lo")


def test_longer_stop_starting_earlier_is_waited_for():
    # "b" completes first, but "abc" starts earlier and may still complete.
    m = StopStringMatcher(["abc", "b"])
    assert m.feed("xab") == ("x", None)
    assert m.feed("c!") == ("", "abc")

    m = StopStringMatcher(["abc", "b"])
    assert m.feed("xab") == ("x", None)
    assert m.feed("d") == ("a", "b")  # "abc" failed: the already complete "b" applies

    m = StopStringMatcher(["abc", "b"])
    assert m.feed("xab") == ("x", None)
    assert m.flush() == "a"  # text ended: "b" applies
    assert m.stopped == "b"


def test_same_start_shortest_wins():
    m = StopStringMatcher(["ab", "abc"], include_stop_str_in_output=True)
    assert m.feed("xabc") == ("xab", "ab")


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])
