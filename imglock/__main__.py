"""``python -m imglock``: the same as the ``imglock`` command."""

from imglock.cli import main

main()
