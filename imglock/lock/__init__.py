"""The lock layer: everything that touches a lock, and nothing that reads an image format.

* :mod:`~imglock.lock.fcntl_locks`: the only caller of ``fcntl(2)`` lock commands;
* :mod:`~imglock.lock.protocol`: how a claim takes, tests and ends its bytes
  (imglock's own layer, and QEMU's bytes as QEMU takes them);
* :mod:`~imglock.lock.identity`: the owner id (host tag and pid) a holder's byte encodes;
* :mod:`~imglock.lock.discovery` and :mod:`~imglock.lock.holder`: who holds an image,
  from any host; :mod:`~imglock.lock.procfs` attributes locks to local processes;
* :mod:`~imglock.lock.records`: holder records (command, since) beside the lock;
* :mod:`~imglock.lock.lockspace`: locks moved to a file in a shared directory.

Nothing here imports :mod:`imglock.formats`, :mod:`imglock.api`, the wrapper
(:mod:`imglock.run`) or the CLI: imports run CLI → run → api → formats and lock.
The submodules are imported where used, so that start-up stays cheap.
"""
