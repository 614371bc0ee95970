"""The wrapper behind ``imglock run``, in layers that each call only the next.

* :mod:`~imglock.run.options`: what the run was asked (one frozen RunOptions);
* :mod:`~imglock.run.plan`: the one plan of a run: adapter, files, lock layers;
  :mod:`~imglock.run.dry_run` renders it, :mod:`~imglock.run.launch` takes it;
* :mod:`~imglock.run.adapters`: a hypervisor's command line and guest control
  (generic, QEMU: :mod:`~imglock.run.handoff`, :mod:`~imglock.run.graph`;
  installed ones through the ``imglock.hypervisors`` entry points);
* :mod:`~imglock.run.runner`: fork, gate, claim on the child's descriptors, signals,
  exit, survivors handed to :mod:`~imglock.run.watcher`;
* :mod:`~imglock.run.session`: the one owner of the run's claim and its states.

It uses :mod:`imglock.api` and :mod:`imglock.qemu`; nothing below it imports it.
"""
