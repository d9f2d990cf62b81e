"""Names the README tells users to call keep working whatever the package has imported."""
from __future__ import annotations


def test_endpoint_key_stays_a_function_after_the_endpoint_module_is_imported(tmp_path, monkeypatch):
    """A submodule named like the function once replaced it on the package as soon as the gateway was imported."""
    import byzer_magic
    from byzer_magic import gateway  # noqa: F401 - importing it is the point

    monkeypatch.setenv("BYZER_MAGIC_HOME", str(tmp_path))
    key = byzer_magic.endpoint_key()
    assert isinstance(key, str) and len(key) >= 32 and key == byzer_magic.endpoint_key()


def test_the_old_flat_names_still_import_after_the_move_into_layers():
    """README and users' scripts write `from byzer_magic import chat, deploy`; the modules now live in layers."""
    import byzer_magic
    from byzer_magic import chat, deploy, gateway, widgets
    from byzer_magic.spec import DeploySpec, parse_spec

    assert (chat.__name__, deploy.__name__) == ("byzer_magic.serving.chat", "byzer_magic.serving.deploy")
    assert (gateway.__name__, widgets.__name__) == ("byzer_magic.openai.gateway", "byzer_magic.frontends.widgets")
    spec = parse_spec("--model e --pretrained_model_type custom/bge --model_path /m --infer_backend transformers")
    assert isinstance(spec, DeploySpec) and spec.name == "e"
    assert byzer_magic.deploy.scale is deploy.scale
    try:
        byzer_magic.no_such_module
    except AttributeError as exc:
        assert "no_such_module" in str(exc)
    else:
        raise AssertionError("an unknown name should raise AttributeError")
