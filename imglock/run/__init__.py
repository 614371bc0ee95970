"""The wrapper behind ``imglock run``: launch policy, the runner, the migration handoff.

* :mod:`~imglock.run.launch`: what to claim for a command, and in which layers;
* :mod:`~imglock.run.runner`: fork, gate, claim on the child's descriptors, signals, exit;
* :mod:`~imglock.run.handoff`: the live-migration handoff through QEMU's monitor.

It uses :mod:`imglock.api` and :mod:`imglock.qemu`; nothing below it imports it.
"""
