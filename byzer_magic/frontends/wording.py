"""Commands named in the words of the front end that shows the message.

Messages are written once, in the notebook's words (`%byzer_undeploy NAME`,
`%%byzer_deploy`, how to set a variable), wherever they are built; the command line
passes everything it prints through `for_shell`, which names its own commands
instead (`byzer-magic undeploy NAME`). So a core function never needs to know
who called it, and the magics keep their words. A mention followed by "in a
notebook" names the notebook on purpose and is kept.
"""
from __future__ import annotations

import re

SHELL_COMMANDS = {
    "deploy": "deploy",
    "chat": "chat",
    "embed": "embed",
    "list": "list",
    "status": "stat",
    "scale": "scale",
    "undeploy": "undeploy",
    "serve": "serve",
    "bench": "bench",
    "history": "history",
    "restore": "restore",
}
"""Each magic (`%byzer_<key>`) and the `byzer-magic` command that does the same."""

_MAGIC = re.compile(r"%%?byzer_(\w+)\b(?! in a notebook)")
_ENV = re.compile(r"%env (\w+)=")
_UNSET = re.compile(r"\(export it where Jupyter or the shell starts, or, leaving no trace in the notebook, run "
                    r"os\.environ\['(\w+)'\] = getpass\.getpass\(\) in a cell\)")


def for_shell(text: str) -> str:
    """The text with every magic it mentions named as the `byzer-magic` command that does the same."""

    def command(match: re.Match) -> str:
        verb = SHELL_COMMANDS.get(match.group(1))
        return f"byzer-magic {verb}" if verb else match.group(0)

    text = _UNSET.sub(r"(set it with export \1=...)", text)
    return _ENV.sub(r"export \1=", _MAGIC.sub(command, text))
