"""A conversation turn is empty exactly when it shows nothing: blank() (the expectation
suite's BLANK, one definition for prompt/response texts and turns) against Python's Unicode
database on every code point it assigns."""

from __future__ import annotations

import sys
import unicodedata

from steps.data.conversation_checks import blank


def test_blank_is_whitespace_controls_and_format_characters_on_every_assigned_code_point():
    # Unassigned here (Cn) is left out: the list also holds format characters of newer
    # Unicode versions (U+13439-U+1343F, Unicode 15) than Python 3.11's database (14.0).
    differ = [
        f"U+{c:04X}"
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) not in ("Cn", "Cs")
        and blank(chr(c)) != (chr(c).isspace() or unicodedata.category(chr(c)) in ("Cc", "Cf"))
    ]
    assert differ == []
    assert blank("") and blank(" \u200b\n") and not blank(" a ")
