"""Mini App initData verification, checked against data signed the way Telegram signs it."""

from __future__ import annotations

import json

import pytest

from channels.telegram_auth import InitDataError, init_data_user_id, verify_init_data
from tests.fake_telegram import TOKEN, sign_init_data

NOW = 1_700_000_000.0


def fields(user_id: int = 4242, auth_date: float = NOW - 60) -> dict[str, str]:
    user = {"id": user_id, "first_name": "Ada", "last_name": "Lovelace", "username": "ada_l",
            "language_code": "en", "allows_write_to_pm": True}
    return {"query_id": "AAHdF6IQAAAAAN0XohDhrOrc", "auth_date": str(int(auth_date)),
            "user": json.dumps(user, separators=(",", ":")),
            "signature": "uNJoHvLQhnk_d2Dpbd2VyObzPKRhAsoqoXnbT_BZKaM0Hv8PZcWw1MIVK1iuo2YmLTi5qQ"}


def test_a_vector_signed_elsewhere_verifies() -> None:
    # From aiogram's test-suite (token "42:TEST"): an independent implementation's output.
    data = ("auth_date=1650385342&user=%7B%22id%22%3A42%2C%22first_name%22%3A%22Test%22%7D"
            "&query_id=test&hash=46d2ea5e32911ec8d30999b56247654460c0d20949b6277af519e76271182803")
    got = verify_init_data(data, "42:TEST", now=1650385342 + 10, max_age=3600)
    assert init_data_user_id(got) == 42
    with pytest.raises(InitDataError, match="not signed by Telegram for this bot"):
        verify_init_data(data, "42:OTHER", now=1650385342 + 10, max_age=3600)


def test_fresh_data_signed_like_telegram_verifies() -> None:
    got = verify_init_data(sign_init_data(fields()), TOKEN, now=NOW, max_age=3600)
    assert init_data_user_id(got) == 4242
    assert got["query_id"] == "AAHdF6IQAAAAAN0XohDhrOrc"
    assert "hash" not in got


def test_a_changed_field_breaks_the_hash() -> None:
    data = sign_init_data(fields(user_id=4242)).replace("4242", "4243")
    with pytest.raises(InitDataError, match="hash does not match"):
        verify_init_data(data, TOKEN, now=NOW, max_age=3600)


def test_old_data_is_refused() -> None:
    data = sign_init_data(fields(auth_date=NOW - 3601))
    with pytest.raises(InitDataError, match="3601 s old, more than the 3600 s allowed"):
        verify_init_data(data, TOKEN, now=NOW, max_age=3600)
    assert verify_init_data(data, TOKEN, now=NOW, max_age=7200)


def test_data_from_the_future_is_refused() -> None:
    with pytest.raises(InitDataError, match="in the future"):
        verify_init_data(sign_init_data(fields(auth_date=NOW + 3600)), TOKEN, now=NOW,
                         max_age=3600)


@pytest.mark.parametrize("data, why", [
    ("", "has no hash"),
    ("garbage", "not a query string"),
    ("auth_date=1&user=%7B%7D", "has no hash"),
    ("auth_date=1&auth_date=2&hash=ab", "repeats a field"),
])
def test_malformed_data_is_refused(data: str, why: str) -> None:
    with pytest.raises(InitDataError, match=why):
        verify_init_data(data, TOKEN, now=NOW, max_age=3600)


def test_data_without_a_user_is_refused() -> None:
    f = fields()
    del f["user"]
    got = verify_init_data(sign_init_data(f), TOKEN, now=NOW, max_age=3600)
    with pytest.raises(InitDataError, match="has no user"):
        init_data_user_id(got)
