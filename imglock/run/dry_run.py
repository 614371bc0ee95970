"""``imglock run --dry-run``: a run's plan rendered, every file opened as the claim opens it.

No lock is taken, no record written and no lock file created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

from imglock.api import Claim, ClaimSpec
from imglock.chain import ChainProblem, open_chain
from imglock.errors import ImglockError
from imglock.formats.base import OpenImage
from imglock.lock.lockspace import lock_file_name
from imglock.lock.protocol import Layer, Mode
from imglock.run.plan import RunPlan
from imglock.run.reporter import Reporter

#: The lock layers by the names ``--dry-run --json`` gives them.
LAYER_NAMES: Final = (
    (Layer.IMGLOCK, "imglock"),
    (Layer.QEMU, "qemu"),
    (Layer.QEMU_TEST, "qemu-test"),
)
#: The flock layer by the ``--flock`` policy that takes it (``"flock"`` in the JSON).
FLOCK_NAMES: Final = ((Layer.FLOCK_EVERYWHERE, "on"), (Layer.FLOCK, "auto"))

#: The keys of a dry run's entry for a file that was not opened.
_NO_FILE: Final[dict[str, Any]] = {
    "filename": None, "format": None, "role": None, "depth": None, "mode": None,
    "claimed": True, "source": None, "lock-file": None, "protocol": None, "problem": None,
}  # fmt: skip


def flock_name(layers: Layer) -> str:
    """How the flock layer is taken: on (everywhere), auto (where not fcntl) or off."""
    return next((name for layer, name in FLOCK_NAMES if layer in layers), "off")


def dry_run(plan: RunPlan, reporter: Reporter) -> dict[str, Any]:
    """What a run of *plan* would claim, as ``imglock run --dry-run --json`` shows it.

    Every image is opened and its chain followed, as for a real run.  A file
    that cannot be opened or followed (missing, unreadable, malformed) is
    listed with its ``problem``, said through *reporter* too, and the
    listing goes on; ``status`` is the exit status of the first problem
    (what a real run would exit with), 0 when there is none.
    """
    files = plan.files
    lockspace = plan.options.lockspace
    listed = [(spec, _chain_problems(lockspace, spec, files.sources)) for spec in files.specs]
    # (index of the named image it comes from, entry): listed in command-line order.
    ordered: list[tuple[int, dict[str, Any]]] = []
    # Chains without a problem are opened as the claim opens them (modes merged alike).
    claim = Claim([spec for spec, problems in listed if not problems], layers=plan.layers).open()
    try:
        tops = {spec.path: n for n, (spec, problems) in reversed(list(enumerate(listed)))
                if not problems}  # fmt: skip
        at = 0
        for member in claim.members:
            # A chain's files follow its named image in the claim's members.
            at = tops.get(member.image.filename, at) if member.named else at
            source = files.sources.get(member.image.filename) if member.named else None
            ordered.append((at, _entry(lockspace, member.image, member.role, member.depth,
                                       member.mode, source)))  # fmt: skip
    finally:
        claim.close()  # no lockspace attached: attaching one creates lock files
    status = 0
    for n, (_spec, problems) in enumerate(listed):
        ordered += [(n, entry) for entry in problems]
        for entry in problems:
            code = entry.pop("status", 0)
            if entry["problem"] is not None:
                reporter.error(entry["problem"])
                status = status or code
    entries = [entry for _n, entry in sorted(ordered, key=lambda pair: pair[0])]
    for remote in files.remote:
        entries.append(
            {**_NO_FILE, "filename": remote.filename, "role": remote.role, "claimed": False,
             "source": remote.source, "protocol": remote.protocol}
        )  # fmt: skip
    return {
        "command": list(plan.options.argv),
        "qemu": plan.adapter.name == "qemu",
        "adapter": plan.adapter.name,
        "layers": [name for layer, name in LAYER_NAMES if layer in plan.layers],
        "flock": flock_name(plan.layers),
        "lockspace": lockspace,
        "images": entries,
        "status": status,
    }


def _entry(
    lockspace: str | None, image: OpenImage, role: str, depth: int, mode: Mode, source: str | None
) -> dict[str, Any]:
    """A dry run's entry for a file opened as a claim opens it."""
    lock_file = None
    if lockspace is not None:
        lock_file = os.path.join(lockspace, lock_file_name(image.filename, image.st))
    return {**_NO_FILE, "filename": image.filename, "format": image.format, "role": role,
            "depth": depth, "mode": mode.value, "source": source or "image header",
            "lock-file": lock_file}  # fmt: skip


def _chain_problems(
    lockspace: str | None, spec: ClaimSpec, sources: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Entries for every file of *spec*'s chain if one of them has a problem, else none.

    An entry with a problem also carries its exit ``status``.
    """
    problems: list[ChainProblem] = []
    source = sources.get(spec.path)
    try:
        chain = open_chain(spec.path, spec.format, backing=spec.backing,
                           data_file=spec.data_file, problems=problems)  # fmt: skip
    except ImglockError as exc:
        return [{**_NO_FILE, "filename": spec.path, "format": spec.format, "role": spec.role,
                 "depth": 0, "mode": spec.mode.value, "source": source, "problem": str(exc),
                 "status": exc.exit_status}]  # fmt: skip
    with chain:
        if not problems:
            return []
        # Only the named file and its own data file take the mode asked for.
        entries = [
            _entry(lockspace, link.image, spec.role if link.role == "top" else link.role,
                   link.depth,
                   spec.mode if link.depth == 0 and link.role != "backing" else Mode.SHARED,
                   source if link.role == "top" else None)
            for link in chain
        ]  # fmt: skip
    for problem in problems:
        mode = spec.mode if problem.depth == 0 and problem.role != "backing" else Mode.SHARED
        entries.append({**_NO_FILE, "filename": problem.filename, "role": problem.role,
                        "depth": problem.depth, "mode": mode.value, "source": "image header",
                        "problem": str(problem.error),
                        "status": problem.error.exit_status})  # fmt: skip
    return entries
