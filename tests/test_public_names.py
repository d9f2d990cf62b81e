"""Names the README tells users to call keep working whatever the package has imported."""
from __future__ import annotations


def test_endpoint_key_stays_a_function_after_the_endpoint_module_is_imported(tmp_path, monkeypatch):
    """A submodule named like the function once replaced it on the package as soon as the gateway was imported."""
    import byzer_magic
    from byzer_magic import gateway  # noqa: F401 - importing it is the point

    monkeypatch.setenv("BYZER_MAGIC_HOME", str(tmp_path))
    key = byzer_magic.endpoint_key()
    assert isinstance(key, str) and len(key) >= 32 and key == byzer_magic.endpoint_key()
