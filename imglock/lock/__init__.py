"""The lock layer: everything that touches a lock, and nothing that reads an image format.

* :mod:`~imglock.lock.fcntl_locks`: the only caller of ``fcntl(2)`` lock commands;
* :mod:`~imglock.lock.protocol`: how a claim takes, tests and ends its bytes
  (imglock's own layer, and QEMU's bytes as QEMU takes them);
* :mod:`~imglock.lock.identity`: the owner id (host tag and pid) a holder's byte encodes;
* :mod:`~imglock.lock.discovery` and :mod:`~imglock.lock.holder`: who holds an image,
  from any host; :mod:`~imglock.lock.procfs` attributes locks to local processes;
* :mod:`~imglock.lock.records`: holder records (command, since) beside the lock;
* :mod:`~imglock.lock.lockspace`: locks moved to a file in a shared directory.

Nothing here imports :mod:`imglock.formats`, :mod:`imglock.chain`, the library
(:mod:`imglock.api`, :mod:`imglock.claims`, :mod:`imglock.report`), the wrapper
(:mod:`imglock.run`) or the CLI; below it are only the base modules
(:mod:`imglock.errors`, :mod:`imglock.faults`, :mod:`imglock.text`,
:mod:`imglock.safeio`).  tests/test_architecture.py holds the layer order.
"""
