"""Give a cluster back the deployments it lost, from the records kept outside it (`records`).

Each kept deployment that the cluster does not run is deployed again with its
own name and flags, one after the other, through the same parser and deploy
as `%%byzer_deploy`; one that cannot be (a `${VAR}` unset here, a secret that
was given literally and so was not kept, a worker that fails) is skipped with
its reason, and the others go on.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from . import deploy as deploy_api
from . import records
from ..errors import ByzerError, SpecError
from ..spec.flags import _Parser
from ..spec.deploy_spec import parse_args
from .status import DeploymentStatus


@dataclass(frozen=True)
class Outcome:
    """What became of one kept deployment."""

    name: str
    restored: bool
    reason: str = ""

    def line(self) -> str:
        if self.restored:
            return f"restored {self.name}: {self.reason}"
        return f"not restored {self.name}: {self.reason}"


@dataclass(frozen=True)
class RestoreReport:
    """One line per kept deployment: restored, already running, or not restored and why."""

    outcomes: tuple[Outcome, ...]

    @property
    def restored(self) -> list[str]:
        return [o.name for o in self.outcomes if o.restored]

    @property
    def failed(self) -> list[str]:
        return [o.name for o in self.outcomes if not o.restored and not o.reason.startswith("already")]

    def __repr__(self) -> str:
        if not self.outcomes:
            return f"nothing to restore: no deployment is kept in {records.state_dir()}"
        return "\n".join(o.line() for o in self.outcomes)

    __str__ = __repr__


def read_args(words: Sequence[str], prog: str = "%byzer_restore") -> argparse.Namespace:
    """The restore command's words, the magic's and the shell's: names, --infer_params key=value..., --ray_address."""
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    parser.add_argument("names", nargs="*", help="deployments to restore (default: every kept one)")
    parser.add_argument("--infer_params", nargs="+", action="extend", metavar="KEY=VALUE",
                        help="settings to add, such as a secret that was given literally and so was not kept")
    parser.add_argument("--ray_address", help="Ray cluster (default: RAY_ADDRESS or the running one)")
    return parser.parse_args(list(words))


def restore(
    names: Sequence[str] = (),
    *,
    infer_params: Sequence[str] = (),
    ray_address: str | None = None,
    env: Mapping[str, str] | None = None,
    on_progress: Callable[[DeploymentStatus], None] | None = None,
) -> RestoreReport:
    """Deploy again every kept deployment (or those named) that the cluster does not run.

    `infer_params` (key=value) are added to each one's kept settings: how a
    secret that was given literally, and so was not kept, is given again.
    """
    kept = {r.name: r for r in records.load_all()}
    unknown = [n for n in names if n not in kept]
    if unknown:
        have = ", ".join(kept) or "none"
        raise SpecError(f"no record of {', '.join(unknown)} in {records.state_dir()} (kept: {have})")
    running = {row.name for row in deploy_api.list_deployments(ray_address=ray_address).rows}
    outcomes = []
    for record in (kept[n] for n in (names or sorted(kept))):
        if record.name in running:
            outcomes.append(Outcome(record.name, False, "already on the cluster, left as it is"))
            continue
        outcomes.append(_restore_one(record, infer_params, ray_address, env, on_progress))
    return RestoreReport(tuple(outcomes))


def _restore_one(record: records.Record, extra: Sequence[str], ray_address: str | None,
                 env: Mapping[str, str] | None, on_progress: Callable | None) -> Outcome:
    given = {word.partition("=")[0] for word in extra}
    lacking = [key for key in record.missing_secrets if key not in given]
    if lacking:
        flags = " ".join(f"{key}=${{VAR}}" for key in lacking)
        return Outcome(record.name, False, f"{', '.join(lacking)} was given literally, so it was not kept: give it "
                                           f"again with %byzer_restore {record.name} --infer_params {flags}")
    idle = record.flags.get("num_workers") == 0
    flags = {k: v for k, v in record.flags.items() if not (idle and k == "num_workers")}
    argv = records.Record(**{**record.__dict__, "flags": flags}).argv(extra)
    if ray_address:
        argv += ["--ray_address", ray_address]
    try:
        spec = parse_args(argv, env)
        ready = deploy_api.deploy(spec, on_progress=on_progress)
        if idle:
            ready = deploy_api.scale(record.name, 0, ray_address=ray_address)
    except ByzerError as exc:
        return Outcome(record.name, False, str(exc))
    return Outcome(record.name, True, ready.line().partition(": ")[2])
