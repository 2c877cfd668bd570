"""What "no visible character" means, for prompt/response texts (the expectation suite,
steps/data/checks.py) and conversation turns (steps/data/conversation_checks.py) alike."""

# Characters that show nothing: whitespace (\s), controls (Unicode Cc) and format characters
# (Unicode Cf: soft hyphen, zero-width space/joiners, direction marks, BOM, tags).
# tests/data/test_text_checks.py checks this list against Python's unicodedata.
INVISIBLE = (
    r"\s\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    r"\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    r"\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    r"\U000e0001\U000e0020-\U000e007f"
)
# Empty passes here: the length check reports it, so a row gets one reason, not two.
VISIBLE_OR_EMPTY = rf"\A\Z|[^{INVISIBLE}]"
BLANK = rf"\A[{INVISIBLE}]*\Z"
