"""``imglock doctor``: are locks on a datastore shared between hosts, and is a lost one seen?"""

from __future__ import annotations

import json
import sys
from typing import Any, Final

import click

from imglock.cli.common import Voice, reported_errors, verbosity_options, write_output
from imglock.cli.params import seconds_option
from imglock.lock import datastore, sharing
from imglock.lock.datastore import Setting
from imglock.lock.sharing import Assessment, ProbeResult
from imglock.lockcheck import DEFAULT_DEADLINE
from imglock.text import visible

#: Exit statuses: the locks are shared between hosts, or that is not shown.
EX_SHARED: Final = 0
EX_NOT_SHOWN: Final = 1
#: The locks are shared, but a setting lets a lost lock pass silently: the
#: datastore is refused.  sysexits' EX_CONFIG, since the fix is a setting,
#: and distinct from 1 so that a script tells "set this" from "not shared".
EX_CONFIG: Final = 78


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--probe",
    is_flag=True,
    help="Also hold a probe lock and look for another host's: run on two hosts at once.",
)
@seconds_option(
    "-w",
    "--wait",
    default=60.0,
    help="With --probe, seconds to wait for another host's probe (inf: until one is seen).",
)
@seconds_option(
    "--check-deadline",
    default=DEFAULT_DEADLINE,
    help="The lock-check deadline to judge the filesystem's timeouts by (imglock run's).",
)
@verbosity_options
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, readable=False))
def doctor(as_json: bool, probe: bool, wait: float, check_deadline: float, directory: str) -> None:
    """Tell whether locks on DIR's filesystem are shared between hosts, and a lost one seen.

    From the mount (its type and options: local filesystems, NFS nolock or
    local_lock=, FUSE filesystems...), and with --probe from a test that two
    hosts run at once: each holds a lock on DIR/.imglock-probe whose offsets
    spell its host name, and names the other host once it sees its lock.
    Then the filesystem's settings that decide whether a lost lock passes
    silently (GlusterFS client.strict-locks, NFS recover_lost_locks, CephFS
    recover_session...) and how long a silent host keeps its locks, each
    judged, with the command that fixes an unsafe one.
    Exits 0 when the locks are shared (with --probe: another machine's probe
    was seen) and no setting is unsafe, 1 when they are not shared or that
    could not be shown, 78 when they are shared but a setting is unsafe.
    """
    voice = Voice.current()
    with reported_errors():
        assessment = sharing.assess(sharing.mount_of(directory))
        settings = datastore.settings(assessment.mount, check_deadline)
        if probe:
            voice.note(f"{directory}: probing for up to {wait:g} s; run the same on another host")
        result = sharing.probe(directory, wait) if probe else None
    shared = (
        result.verdict == sharing.Verdict.SHARED
        if result is not None
        else assessment.verdict == sharing.Verdict.SHARED
    )
    silent = shared and any(setting.safe is False for setting in settings)
    if as_json:
        report = to_json(directory, assessment, result, shared)
        report["settings"] = [setting_json(setting) for setting in settings]
        report["silent-loss"] = silent
        write_output(json.dumps(report, indent=2))
    else:
        lines = describe(directory, assessment, result)
        lines[1:1] = [describe_setting(directory, setting) for setting in settings]
        if silent:
            lines.append(
                f"{directory}: refused: locks are shared, but a lost lock can pass silently "
                "here; apply the fixes above"
            )
        for line in lines:
            write_output(visible(line))
    sys.exit(EX_CONFIG if silent else EX_SHARED if shared else EX_NOT_SHOWN)


def describe_setting(directory: str, setting: Setting) -> str:
    if setting.safe is None and setting.value is None:
        return f"{directory}: {setting.name}: not read: {setting.why}; check: {setting.check}"
    head = f"{directory}: {setting.name} {setting.value} ({setting.source})"
    if setting.safe is None:
        return f"{head}: {setting.why}"
    if setting.safe:
        return f"{head}: safe: {setting.why}"
    return f"{head}: UNSAFE: {setting.why}; fix: {setting.fix}"


def setting_json(setting: Setting) -> dict[str, Any]:
    return {
        "name": setting.name,
        "value": setting.value,
        "safe": setting.safe,
        "why": setting.why,
        "fix": setting.fix,
        "source": setting.source or None,
        "check": setting.check,
    }


def describe(directory: str, assessment: Assessment, result: ProbeResult | None) -> list[str]:
    mount = assessment.mount
    lines = [
        f"{directory}: {mount.fstype} ({mount.source} on {mount.mount_point}): "
        f"locks {_MOUNT_VERDICTS[assessment.verdict]}: {assessment.reason}"
    ]
    if result is None:
        return lines
    if not result.peers:
        lines.append(
            f"{directory}: probe: no other host's probe seen from {result.host}: locks are "
            "not shown to be shared (was the probe running on another host meanwhile?)"
        )
    for peer in result.peers:
        if peer.same_kernel:
            lines.append(
                f"{directory}: probe: {peer.host} seen, but its lock is in this kernel's "
                f"/proc/locks: it runs on this machine, which proves nothing about other hosts"
            )
        else:
            lines.append(
                f"{directory}: probe: {peer.host} seen from {result.host}: locks on this "
                "filesystem are shared between the two hosts"
            )
    return lines


_MOUNT_VERDICTS: Final = {
    "shared": "are shared between hosts",
    "local": "stay on this host",
    "unknown": "may or may not be shared",
}


def to_json(
    directory: str, assessment: Assessment, result: ProbeResult | None, shared: bool
) -> dict[str, Any]:
    mount = assessment.mount
    out: dict[str, Any] = {
        "directory": directory,
        "shared": shared,
        "mount": {
            "mount-point": mount.mount_point,
            "fstype": mount.fstype,
            "source": mount.source,
            "options": list(mount.options),
            "verdict": str(assessment.verdict),
            "reason": assessment.reason,
        },
        "probe": None,
    }
    if result is not None:
        out["probe"] = {
            "host": result.host,
            "verdict": str(result.verdict),
            "peers": [
                {"host": peer.host, "same-kernel": peer.same_kernel} for peer in result.peers
            ],
        }
    return out
