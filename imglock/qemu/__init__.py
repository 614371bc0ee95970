"""What imglock knows about QEMU: its command line and its QMP monitor.

:mod:`imglock.qemu.cmdline` finds the disk images a ``qemu-system-*``
command line opens and adds the options ``imglock run`` needs;
:mod:`imglock.qemu.monitor` drives a QEMU through a private QMP socket to
hand an image over during a live migration.
"""
