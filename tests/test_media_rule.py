"""`validation = "media"` means a file: a photo, document, voice note, audio or video (or a
typed http(s) link, all the web chat carries). A location or a contact is not a file, on
any channel; Telegram's and WhatsApp's own cases are in their test files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.support import write_config
from tests.test_web_channel import chat_app, texts

ASK = """
[flows.main]
start = "ask"
[flows.main.blocks.ask]
type = "input"
text = "Send the receipt"
variable = "receipt"
validation = "media"
retry_message = "A file, please."
next = "done"
[flows.main.blocks.done]
type = "end"
text = "Got {{receipt}}"
"""


@pytest.mark.parametrize(("answer", "taken"), [
    ("geo:52.520008,13.404954", False),  # a location typed as a URI
    ("BEGIN:VCARD FN:Grace END:VCARD", False),  # a contact pasted as text
    ("ftp://files.example/r.pdf", False),
    ("https://", False),
    ("see https://files.example/r.pdf", False),  # the whole answer must be the link
    ("HTTPS://Files.Example/r.pdf", True),
    ("http://files.example/r.pdf?x=1#p", True),
])
async def test_the_web_chat_takes_a_link_and_nothing_else(tmp_path: Path, answer: str,
                                                          taken: bool) -> None:
    config = write_config(tmp_path, ASK)
    config = replace(config, channels=replace(
        config.channels, web=replace(config.channels.web, enabled=True)))
    async with chat_app(config) as c:
        tab = c.tab()
        await tab.open()
        assert texts(await tab.say("hi")) == ["Send the receipt"]
        expected = [f"Got {answer}"] if taken else ["A file, please.", "Send the receipt"]
        assert texts(await tab.say(answer)) == expected
