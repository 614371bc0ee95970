"""Claiming images: the parts of :class:`imglock.api.Claim`, one concern each.

* :mod:`~imglock.claims.spec`: what to claim (:class:`ClaimSpec`) and the
  checks of a caller's arguments;
* :mod:`~imglock.claims.image`: one open file and the locks held on it, the
  library's one route to the lock protocol (:mod:`imglock.lock.protocol`);
* :mod:`~imglock.claims.member`: one file of a claim: its image, its mode,
  what it is to the VM, its holder record;
* :mod:`~imglock.claims.opening`: opening the images and their chains;
* :mod:`~imglock.claims.conflicts`: naming who is in a claim's way;
* :mod:`~imglock.claims.waiting`: the queue and the pauses of a claim that waits;
* :mod:`~imglock.claims.holder_records`: the holder records written beside the locks;
* :mod:`~imglock.claims.graph_edits`: files added, dropped or changed while held
  (a VM's block graph);
* :mod:`~imglock.claims.migration`: what a live migration needs: all settled
  ahead of the switch-over, and the explicit unlock of its source;
* :mod:`~imglock.claims.facade`: :class:`Claim`, which puts them together
  (and owns the claim's life across forks).

Imports run facade -> the others -> :mod:`imglock.lock`, :mod:`imglock.formats`
and :mod:`imglock.chain`; nothing here imports the wrapper or the CLI.
"""
