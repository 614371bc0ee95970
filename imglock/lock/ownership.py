"""Who may use imglock's files for an image: no one who may not use the image itself.

Anyone who can open a lockspace lock file can lock its bytes, and so hold
the image or keep it from others; anyone who can write a holder record
can make ``status`` say who holds it.  So each such file takes the owner,
group and mode that follow from the image's (imglock(7), OWNERSHIP):

* its group is the image's, where the writer may give it (root may, and
  a member of the group); a lock file, which every claimer of the image
  shares, also takes the image's owner (where root gives it), while a
  record, one holder's statement, stays its writer's;
* it is readable by its owner, and by its group and by others only where
  the image is readable or writable by the same people: the group class
  when the group is the image's and the image grants its group access,
  the others when the image grants them access (a group other than the
  image's counts as "others" of the image);
* it is writable by no one (it is never written in place).

A file found with an owner who may not use the image, or a mode that lets
in anyone the image keeps out, hands out more than the image does
(:func:`excess` says why): it is refused, unless only its mode has gone
stale (an older imglock made lock files 0644; an image may have been made
private since) and the caller may set it right.  Permission bits are what
is compared; ACLs on the image are not read.
"""

from __future__ import annotations

import functools
import os
import pwd
import stat
from typing import Final

#: Read and write, for one permission class (``rw-``), in the low bits.
_ACCESS: Final = 0o6
_OWNER_READ: Final = stat.S_IRUSR
_GROUP_SHIFT: Final = 3


def _grants(mode: int, shift: int) -> bool:
    """Whether the class at *shift* (0 others, 3 group, 6 owner) may read or write."""
    return bool((mode >> shift) & _ACCESS)


@functools.cache
def _member(uid: int, gid: int) -> bool:
    """Whether user *uid* is in group *gid*, as its primary group or a supplementary one.

    The groups are those a login of the user gets (getgrouplist(3), through
    every NSS source), which a group's member list alone may not show: a
    directory service need not enumerate the members of its groups.
    """
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    try:
        return gid in os.getgrouplist(user.pw_name, user.pw_gid)
    except OSError:
        return user.pw_gid == gid


def may_use(uid: int, image: os.stat_result) -> bool:
    """Whether user *uid* may open the image (root, its owner, or by its mode)."""
    if uid in (0, image.st_uid, os.geteuid()):  # we opened it: we may
        return True
    if _grants(image.st_mode, 0):
        return True
    return _grants(image.st_mode, _GROUP_SHIFT) and _member(uid, image.st_gid)


def _group_allowed(gid: int, image: os.stat_result) -> bool:
    """Whether group *gid*'s class of a file may have access, for this image."""
    shift = _GROUP_SHIFT if gid == image.st_gid else 0
    return _grants(image.st_mode, shift)


def mode_for(uid: int, gid: int, image: os.stat_result) -> int:
    """The permission bits of an imglock file owned by *uid*:*gid*, for *image*."""
    mode = _OWNER_READ
    if _group_allowed(gid, image):
        mode |= stat.S_IRGRP
    if _grants(image.st_mode, 0):
        mode |= stat.S_IROTH
    return mode


def excess(st: os.stat_result, image: os.stat_result) -> str | None:
    """Why a file of *st* hands out more power over *image* than the image does, or None."""
    if not may_use(st.st_uid, image):
        return f"belongs to uid {st.st_uid}, who may not open the image"
    if _grants(st.st_mode, _GROUP_SHIFT) and not _group_allowed(st.st_gid, image):
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets group {st.st_gid} in; the image does not"
    if _grants(st.st_mode, 0) and not _grants(image.st_mode, 0):
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets everyone in; the image does not"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others write it"
    return None


def adopt(fd: int, image: os.stat_result, *, owner: bool) -> os.stat_result:
    """Give the file open as *fd* the image's group (and with *owner*, its owner), and its mode.

    Each where we may; returns the file's status afterwards.
    """
    tries = ((image.st_uid, image.st_gid),) if owner else ()
    for uid, gid in (*tries, (-1, image.st_gid)):
        try:
            os.fchown(fd, uid, gid)
            break
        except OSError:  # not root, not in the image's group, no owners here: keep ours
            continue
    st = os.fstat(fd)
    os.fchmod(fd, mode_for(st.st_uid, st.st_gid, image))
    return os.fstat(fd)
