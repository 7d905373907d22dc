"""The state directory's permissions: what the agent guards stays with the agent and its group.

``agent.db`` holds every job's prompt and answer, ``registry/local-keys`` the device's signing
keys, and ``registry/blobs`` the models. No other local user may read any of it. The layout:

========================  ======  ================================================
path                      mode    why
========================  ======  ================================================
``<state_dir>/``          0750    the agent, and group ``edgelm`` (apps that may use it)
``agent.db`` (+ WAL)      0640    prompts and answers: the same people who may call
                                  the socket (mode 0660) may read them, nobody else
``registry/local-keys/``  0700    signing keys: the agent alone (files 0600)
``registry/blobs/…``      0440    models, read-only, for the agent and its group
everything else           0750    folders; files 0640 (``state.json``, metadata…)
========================  ======  ================================================

Nothing under the state directory is readable by other users. The daemon runs with umask 027,
so whatever it creates gets these modes, and at every start it walks the tree and takes away
what "others" may do on what an older agent created with looser modes (0644 files, 0755
directories), so an upgrade closes the gap without anyone running chmod. A state directory
that is a symbolic link (to a data partition, say) is tightened where it points; links inside
the tree are never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from edgelm_agent.errors import ConfigError

log = structlog.get_logger(__name__)

UMASK = 0o027
DIR_MODE = 0o750
PRIVATE_DIRS = ("registry/local-keys",)


def use_private_umask() -> None:
    """Files the process creates from now on are not readable by other users."""
    os.umask(UMASK)


def _tighten(path: Path, *, private: bool = False) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return  # never chmod through a link
    mode = stat.S_IMODE(st.st_mode)
    wanted = mode & (0o700 if private else ~0o007)
    if wanted == mode:
        return
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        # Someone else's file (root copied a model in, say): only its owner may chmod it. It
        # is not the agent's to guard, and refusing to start over it would stop serving.
        log.warning(
            "state_permissions_not_ours", path=str(path), owner_uid=st.st_uid, mode=oct(mode)
        )
        return
    os.chmod(path, wanted)
    log.info("state_permissions_tightened", path=str(path), was=oct(mode), now=oct(wanted))


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state directory (0750), or take what others may do away from everything in
    an old one."""
    use_private_umask()
    try:
        state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        real = state_dir.resolve()  # a link is the operator's choice of place: tighten that
        _tighten(real)
        private = [real / name for name in PRIVATE_DIRS]
        for folder, dirs, files in os.walk(real):  # never into a linked folder
            for name in dirs + files:
                path = Path(folder) / name
                _tighten(path, private=any(path.is_relative_to(p) for p in private))
    except OSError as exc:
        raise ConfigError(f"cannot prepare state directory {state_dir}: {exc.strerror}") from exc
