"""One deploy of a name at a time, with a lapsed claim taken over by one driver only.

The store here is a dict behind raydoor's key-value functions, with the same
put-if-absent rule as the GCS's; the real store's behaviour is tested with
two deploys at once in `test_deploy_saas.py`. What a dict makes possible is
a chosen interleaving: a second driver acting between the first one's read of
a lapsed claim and its takeover, which a real cluster shows only by chance.
"""
from __future__ import annotations

import contextlib
import json
import time

import pytest

from byzer_magic.errors import DeployError
from byzer_magic.serving import deploy, raydoor


class Store:
    """A key-value store with Ray's internal_kv rules: put without overwrite stores only a free key."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.on_get = None

    def put(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def claim(self, key: str, value: str) -> bool:
        if key in self.values:
            return False
        self.values[key] = value.encode()
        return True

    def get(self, key: str) -> bytes | None:
        found = self.values.get(key)
        if self.on_get is not None:
            hook, self.on_get = self.on_get, None
            hook()
        return found

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


@pytest.fixture
def store(monkeypatch) -> Store:
    found = Store()
    for name, fn in (("kv_put", found.put), ("kv_claim", found.claim), ("kv_get", found.get), ("kv_del", found.delete)):
        monkeypatch.setattr(raydoor, name, fn)
    return found


def lapsed() -> str:
    return json.dumps({"until": time.time() - 1})


def test_a_free_name_is_claimed_for_the_deploy_and_freed_after(store):
    with deploy._one_deploy_at_a_time("m", 60):
        assert json.loads(store.values["deploying/m"])["until"] > time.time()
    assert store.values == {}


def test_a_live_claim_refuses_a_second_deploy_in_one_sentence(store):
    with deploy._one_deploy_at_a_time("m", 60):
        with pytest.raises(DeployError, match="another deploy of 'm' is under way") as refused:
            with deploy._one_deploy_at_a_time("m", 60):
                pass
        assert "\n" not in str(refused.value)
        assert "deploying/m" in store.values, "the refused deploy leaves the first one's claim alone"


def test_a_lapsed_claim_is_taken_over_and_everything_is_freed_after(store):
    store.put("deploying/m", lapsed())
    with deploy._one_deploy_at_a_time("m", 60):
        assert json.loads(store.values["deploying/m"])["until"] > time.time()
    assert store.values == {}


def test_two_drivers_that_both_find_a_claim_lapsed_do_not_both_deploy(store):
    """Between a driver's read of a lapsed claim and its takeover, another driver takes the claim over: one deploys."""
    store.put("deploying/m", lapsed())
    first = contextlib.ExitStack()
    store.on_get = lambda: first.enter_context(deploy._one_deploy_at_a_time("m", 60))
    with pytest.raises(DeployError, match="under way"):
        with deploy._one_deploy_at_a_time("m", 60):
            pytest.fail("both drivers went on to deploy")
    assert json.loads(store.values["deploying/m"])["until"] > time.time(), "the first driver's claim stands"
    first.close()
    assert store.values == {}, "the first deploy's end frees the name and its takeover"


def test_a_claim_freed_between_the_two_reads_is_claimed_afresh(store, monkeypatch):
    """The claim's own deploy ends after this driver's claim failed and before it read the claim: the name is free."""
    store.put("deploying/m", json.dumps({"until": time.time() + 60}))

    def get_after_its_deploy_ended(key: str) -> bytes | None:
        store.delete(key)
        return store.get(key)

    monkeypatch.setattr(raydoor, "kv_get", get_after_its_deploy_ended)
    with deploy._one_deploy_at_a_time("m", 60):
        assert "deploying/m" in store.values
    assert store.values == {}
