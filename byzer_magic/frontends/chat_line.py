"""Reading a `%byzer_chat` line: options and a name first, then the question verbatim.

Plain functions without IPython, so the splitting rules are tested alone.
Which options take a value comes from `options.ChatOptions`.
"""
from __future__ import annotations

import re
import shlex

from ..errors import SpecError
from ..spec.option_args import value_flags
from ..spec.options import ChatOptions

_VALUED = value_flags(ChatOptions)
_CHAT_LINE = re.compile(r"^(\s*(?:[A-Za-z_][\w.]*\s*=\s*)?)%(byzer_chat|byzer_embed)\s+(\S+\s+\S.*?)\s*$")


def keep_question_marks(lines: list[str]) -> list[str]:
    """Input transformer: `%byzer_chat NAME What is Ray?` is a question, not `Ray?` help.

    IPython reads any line ending in `?` as a help request for its last word;
    a chat or embed line with text (`vec = %byzer_embed NAME Why?` too) becomes
    an explicit magic call before that rule runs. `%byzer_chat?` and
    `%byzer_chat NAME?` still ask for help.
    """
    out = []
    for line in lines:
        match = _CHAT_LINE.match(line)
        if match and line.rstrip().endswith("?"):
            line = f"{match.group(1)}get_ipython().run_line_magic({match.group(2)!r}, {match.group(3)!r})\n"
        out.append(line)
    return out


def split_chat_line(line: str) -> tuple[list[str], str]:
    """Options and the name come first; the rest of the line is the prompt, verbatim.

    So apostrophes, dashes and quotes in a question need no escaping.
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    options: list[str] = []
    named = False
    expect_value = False
    while True:
        start = lexer.instream.tell()
        rest = line[start:].lstrip()
        if named and not expect_value and not rest.startswith("-"):
            return options, rest.strip()
        try:
            token = lexer.get_token()
        except ValueError as exc:
            raise SpecError(f"%byzer_chat: {exc} in the options") from None
        if token is None:
            return options, ""
        if expect_value or token.startswith("-"):
            options.append(token)
            expect_value = not expect_value and token.split("=")[0] in _VALUED and "=" not in token
            continue
        options.append(token)
        named = True
