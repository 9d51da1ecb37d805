"""Named points where the fault tests kill a process (``RETRO_FAILPOINT=<name>``), as etcd's and
TiKV's failpoints do; without the variable a failpoint does nothing.

    deletion-logged      retro_db.deletions: after the audit log's line, before the deleted list
    add-documents:<step> pipeline.add_documents: after reserved, chunks, embeddings, index
"""

import logging
import os
import signal

log = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    """SIGKILL this process when ``RETRO_FAILPOINT`` names this point (nothing is flushed: a real crash)."""
    if os.environ.get("RETRO_FAILPOINT") == name:
        log.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)
