"""TweetEval-style text cleaning, available to every task through ``data.clean_text``.

The steps follow the preprocessing recommended for TweetEval in seed 002, in order:

1. decode HTML entities (``&amp;`` -> ``&``, ``&lt;br&gt;`` -> ``<br>``);
2. drop HTML tags (``<br>``, ``<b>``, ``</i>`` ...), leaving a space so that words on
   either side of a ``<br>`` stay apart. Seed 002's pattern ``<[^>]+>`` would also eat
   text such as ``<3 so happy <br>`` (from the ``<`` of the heart to the next ``>``);
   here a tag must start with a letter or ``/``;
3. URLs (``http://…``, ``https://…``, ``www.…``) -> ``[URL]``;
4. user mentions (``@name``) -> ``[USER]``;
5. collapse runs of whitespace to one space and strip the ends.
"""

from __future__ import annotations

import html
import re

# A tag starts with a letter (or / for a closing tag): "<3" and "a < b > c" are text, not tags.
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION = re.compile(r"@\w+")


def clean_text(text: str) -> str:
    """Clean one string (see the module docstring for the steps).

    >>> clean_text("@bob loved it &amp; more<br/>see https://t.co/x  ")
    '[USER] loved it & more see [URL]'
    """
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = _URL.sub("[URL]", text)
    text = _MENTION.sub("[USER]", text)
    return " ".join(text.split())


def clean_texts(texts: list[str]) -> list[str]:
    return [clean_text(t) for t in texts]
