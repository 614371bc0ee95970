"""``imglock run``, put together: plan, claim session, adapter, runner.

The layers, each calling only the next::

    imglock.cli.run      click options -> RunOptions (once)
    plan                 RunOptions -> RunPlan (adapter, files, layers)
    launch / dry_run     a RunPlan taken, or rendered
    adapters.*           the VMM's command line prepared, its guest attached
    runner               fork, gate, claim, exec, wait, signals, survivors
    session              the claim's states, the lock check
    imglock.api          the claim itself
"""

from __future__ import annotations

from typing import Final

from imglock.run.options import RunOptions
from imglock.run.plan import RunPlan, plan_run
from imglock.run.reporter import Reporter
from imglock.run.runner import Runner, run_command
from imglock.run.session import ClaimSession

#: What ``imglock run`` says when a QEMU command line opens no local file.
NOTHING_LOCAL: Final = "the QEMU command line opens no local image: nothing local is claimed"


def launch(options: RunOptions, reporter: Reporter | None = None) -> int:
    """Run the command of *options* with its files claimed; return the wrapper's exit status."""
    reporter = reporter or Reporter()
    return run_plan(plan_run(options), reporter)


def run_plan(plan: RunPlan, reporter: Reporter) -> int:
    """Take *plan*: the adapter prepares the command, the runner runs it under the claim."""
    if not plan.files.specs:
        reporter.warn(NOTHING_LOCAL)
    session = ClaimSession(plan.claim(), reporter)
    vmm = plan.adapter.prepare(plan.options, plan.command, reporter)
    options = plan.options
    if options.exec_in_place:
        # Deliberately lazy, as the runner's watcher: only --exec needs the
        # helper, and /proc's lock table with it (start-up of every run).
        from imglock.run.in_place import InPlace

        in_place = InPlace(session, vmm, options.check_interval, options.check_deadline)
        try:
            return run_command(in_place, options.conflict_exit)
        finally:
            vmm.close(watched=False)  # reached only if the command was not exec'd
    runner = Runner(session, vmm, options.check_interval, options.check_deadline)
    try:
        return run_command(runner, options.conflict_exit)
    finally:
        vmm.close(watched=bool(runner.watcher))
