"""Errors the user can act on, kept picklable so they cross Ray unchanged.

Every error here carries an already-redacted message: they are built from
user input or provider answers, and the user sees them verbatim.
"""
from __future__ import annotations

import re
from typing import Iterable


class ByzerError(Exception):
    """Base of the errors a front end shows as one paragraph, without a traceback."""

    def __reduce__(self):
        return (type(self), self.args)


class SpecError(ByzerError):
    """The deploy spec is wrong: a flag, a value or an infer_params key."""


class FieldError(SpecError):
    """One request field a deployment cannot honour as given; the endpoint answers 400 naming `param`."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(param, message, code)
        self.param = param
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class DeployError(ByzerError):
    """The spec was fine but the cluster could not run it; nothing was left behind."""


class NotDeployedError(ByzerError):
    """A name that no deployment on the cluster carries."""


class WrongTaskError(ByzerError):
    """A chat sent to an embedding model, or texts to embed sent to a chat model."""


class BackendError(ByzerError):
    """A backend (a provider, a model library) failed a request.

    Kept as three plain fields so that Ray pickles it by value and the
    notebook shows the provider's own words instead of an unpickling failure.
    """

    def __init__(self, provider: str, status_code: int | None, message: str):
        super().__init__(provider, status_code, message)
        self.provider = provider
        self.status_code = status_code
        self.message = message

    def __str__(self) -> str:
        code = f" (HTTP {self.status_code})" if self.status_code else ""
        return f"{self.provider}{code}: {self.message}"


_KEY_ECHO = re.compile(r"(api key provided:\s*)\S+", re.IGNORECASE)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove every secret, and any provider echo of a key, from text.

    Providers quote part of a rejected key back ("Incorrect API key provided:
    sk-ab***yz"); that echo is cut too, so a half key never reaches output.
    """
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return _KEY_ECHO.sub(r"\1***", text)
