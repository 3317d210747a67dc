"""Cutting long texts for platforms' limits: Telegram counts UTF-16 code units (4,096 for a
message, 1,024 for a caption); cuts fall at line breaks, else spaces, else between grapheme
clusters, never inside an emoji, a flag, a ZWJ sequence or a combining sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from channels.base import cut_text, split_text, utf16_len
from tests.fake_telegram import (  # noqa: F401 - the fixtures `fake` and `no_internet`
    FakeTelegram,
    fake_telegram_fixture,
    no_internet_fixture,
)
from tests.test_telegram import MEDIA_OUT_FLOWS, env, telegram, tg_config  # noqa: F401 - env

WOMAN_CODER = "👩\u200d💻"  # 👩‍💻: 3 code points, 5 UTF-16 units
FAMILY = "👨\u200d👩\u200d👧\u200d👦"  # 7 code points, 11 UTF-16 units
FLAG = "🇩🇪"  # two regional indicators, 4 units
E_ACUTE = "e\u0301"  # e + combining acute accent


def clusters(text: str) -> list[str]:
    return regex.findall(r"\X", text)


def test_utf16_length_counts_astral_characters_twice() -> None:
    assert utf16_len("abc") == 3
    assert utf16_len("😀") == 2
    assert utf16_len(WOMAN_CODER) == 5
    assert utf16_len(FAMILY) == 11
    assert utf16_len(FLAG) == 4
    assert utf16_len("שלום") == 4  # RTL letters are in the BMP
    assert utf16_len(E_ACUTE) == 2


def test_a_text_within_the_limit_is_one_part() -> None:
    assert split_text("😀" * 2048, 4096, utf16_len) == ["😀" * 2048]
    assert cut_text("short", 10) == ("short", "")


def test_4096_emoji_are_two_messages_of_2048() -> None:
    """4,096 emoji are 8,192 UTF-16 units: Telegram takes 2,048 of them per message."""
    parts = split_text("😀" * 4096, 4096, utf16_len)
    assert parts == ["😀" * 2048, "😀" * 2048]


def test_the_cut_prefers_a_line_break_then_a_space() -> None:
    text = "a long first line, ends at 30\n" + "word " * 10
    assert split_text(text, 40) == ["a long first line, ends at 30",
                                    "word word word word word word word word", "word word "]
    head, rest = cut_text("aaaa bbbb\ncccc dddd eeee", 22)
    assert (head, rest) == ("aaaa bbbb\ncccc dddd", "eeee")  # the break is in the first half
    head, rest = cut_text("aaaa\nbbbb cccc dddd eeee", 22)
    assert (head, rest) == ("aaaa\nbbbb cccc dddd", "eeee")  # a space in the second half wins


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


@pytest.mark.parametrize(("unit", "limit"), [
    (unit, limit) for unit in (WOMAN_CODER, FAMILY, FLAG, E_ACUTE, "😀", "ש")
    for limit in (7, 11, 12, 13, 1024) if utf16_len(unit) <= limit])  # else: see below
def test_a_hard_cut_never_tears_a_grapheme_cluster(unit: str, limit: int) -> None:
    text = unit * 300
    parts = split_text(text, limit, utf16_len)
    assert "".join(parts) == text
    for part in parts:
        assert utf16_len(part) <= limit
        assert set(clusters(part)) == {unit}  # whole clusters only
        part.encode("utf-8")  # no lone surrogate (would raise)


def test_rtl_text_is_cut_between_words() -> None:
    text = " ".join(["שלום", "עולם", "مرحبا", "بالعالم"] * 100)
    parts = split_text(text, 100, utf16_len)
    assert " ".join(parts) == text
    assert all(utf16_len(p) <= 100 and not p.startswith(" ") and not p.endswith(" ")
               for p in parts)


def test_a_cluster_longer_than_the_limit_is_cut_by_code_point() -> None:
    """Only for absurd limits: splitting must go on rather than loop."""
    assert split_text(FAMILY, 4, utf16_len) == ["👨\u200d", "👩\u200d", "👧\u200d", "👦"]
    assert split_text("😀😀", 1, utf16_len) == ["😀", "😀"]  # one code point at least


def test_only_separators_at_the_cut_are_dropped() -> None:
    assert split_text(" " * 30 + "x", 10) == [" " * 10, " " * 10, " " * 10, "x"]


TEXT = st.lists(st.sampled_from(
    ["a", "b", " ", "\n", "😀", WOMAN_CODER, FLAG, E_ACUTE, "ש", "م", "\u200d", "\ufe0f"]),
    max_size=200).map("".join)


@given(TEXT, st.integers(min_value=12, max_value=120))
def test_parts_fit_and_lose_only_separators(text: str, limit: int) -> None:
    parts = split_text(text, limit, utf16_len)
    assert all(utf16_len(p) <= limit for p in parts)
    assert all(p for p in parts) or parts == [text]
    squeezed = "".join(parts).replace(" ", "").replace("\n", "")
    assert squeezed == text.replace(" ", "").replace("\n", "")
    assert all(p.encode("utf-16-le").decode("utf-16-le") == p for p in parts)


# -- through the Telegram channel and the fake Bot API, which counts as Telegram does --------

async def test_a_caption_of_emoji_is_cut_at_1024_utf16_units(
        tmp_path: Path, fake: FakeTelegram) -> None:
    """600 ZWJ sequences (3,000 units): the caption takes 204 of them (1,020 units), the
    rest follows as one message; Python's len() would have counted 1,800 / 3 per emoji."""
    long = WOMAN_CODER * 600
    flows = MEDIA_OUT_FLOWS.replace("{long}", long)
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        await tg.say("hello", 1, first_name="Ada", last_name="")
        calls = [(c.method, c.params) for c in fake.calls
                 if c.method in ("sendPhoto", "sendDocument", "sendMessage")]
        assert [m for m, _ in calls][:3] == ["sendPhoto", "sendDocument", "sendMessage"]
        caption, rest = calls[1][1]["caption"], calls[2][1]["text"]
        assert caption == WOMAN_CODER * 204 and utf16_len(caption) == 1020
        assert rest == WOMAN_CODER * 396
        assert all(r[0] == "sent" for r in await tg.outbox_rows())


async def test_a_text_of_4096_utf16_units_is_one_message(
        tmp_path: Path, fake: FakeTelegram) -> None:
    text = "é" * 4000 + "😀" * 48  # 4,096 units: no longer split at 4,000 characters
    flows = f"""
[flows.main]
start = "a"
[flows.main.blocks.a]
type = "end"
text = "{text}"
"""
    async with telegram(tg_config(tmp_path, fake, flows=flows), fake) as tg:
        await tg.say("hello", 1)
        assert [p["text"] for p in fake.sent()] == [text]


async def test_the_fake_refuses_what_telegram_refuses(fake: FakeTelegram) -> None:
    """The boundary is the real one: 4,097 units are refused, so the split above is needed."""
    async with httpx.AsyncClient() as http:
        for text, ok in [("😀" * 2048, True), ("😀" * 2048 + "a", False)]:
            resp = await http.post(f"{fake.base_url}{fake.token}/sendMessage",
                                   json={"chat_id": 1, "text": text})
            doc: dict[str, Any] = resp.json()
            assert doc["ok"] is ok
            if not ok:
                assert doc["description"] == "Bad Request: message is too long"
