"""Messages that once said what was not so, checked without a cluster."""
from byzer_magic.openai.gateway import Endpoint
from byzer_magic.frontends.magics import ready_line
from byzer_magic.spec.deploy_spec import parse_spec
from byzer_magic.serving.status import DeploymentStatus, State


def test_an_embedding_models_ready_line_names_byzer_embed_not_byzer_chat():
    spec = parse_spec("--model emb --pretrained_model_type custom/bge --model_path /models/bge --infer_backend transformers")
    line = ready_line(spec, 1.25)
    assert line == "emb ready in 1.2 s: embed with %byzer_embed emb TEXT"
    chat = parse_spec("--model c --pretrained_model_type custom/auto --model_path /m --infer_backend transformers")
    assert ready_line(chat, 2).endswith("chat with %byzer_chat c ...")


def test_a_stopped_endpoint_does_not_say_how_to_stop_it():
    stopped = repr(Endpoint("127.0.0.1", 8000, True, State.STOPPED))
    assert stopped.startswith("OpenAI-compatible endpoint stopped at http://127.0.0.1:8000/v1")
    assert "--stop" not in stopped
    assert "stop it with %byzer_serve --stop" in repr(Endpoint("127.0.0.1", 8000, True, State.RUNNING))


def test_states_print_and_compare_as_their_words():
    status = DeploymentStatus("a", State.SCALING, 1, 2, "scaling up to 2 workers")
    assert status.state == "scaling" and f"{status.state}" == "scaling"
    assert status.line() == "a: scaling, 1/2 workers, ? ? (scaling up to 2 workers)"
