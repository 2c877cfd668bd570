"""A conversation turn is empty exactly when a prompt/response text is: the two definitions of
"no visible character" (conversation checks use Python's unicodedata, the GX suite a regex
list) agree on every code point Python's Unicode database assigns."""

from __future__ import annotations

import re
import sys
import unicodedata

from steps.data.checks import BLANK
from steps.data.conversation_checks import blank


def test_blank_turns_and_blank_texts_are_the_same_assigned_code_points():
    # Unassigned here (Cn) is left out: the regex also lists format characters of newer
    # Unicode versions (U+13439-U+1343F, Unicode 15) than Python 3.11's database (14.0).
    regex = re.compile(BLANK)
    differ = [
        f"U+{c:04X}"
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) not in ("Cn", "Cs")
        and blank(chr(c)) != bool(regex.match(chr(c)))
    ]
    assert differ == []
