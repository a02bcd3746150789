"""The coordinator's side of governance: the run's ledger file, followed as maintainers' entries are appended.

The operator appends signed proposals and votes with `essaim gov submit`; the
coordinator reads the file again when it changes and adopts it only if it
verifies and extends what it had. Register credits certificates of the
institutions it admits (coordinator/admission.py), and leases follow its mixture
weights; workers get the ledger with the run config and apply the training settings.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from governance.documents import GovernanceError
from governance.ledger import Ledger, follow

log = logging.getLogger("essaim.coordinator")


class GovernedRun:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.ledger, self.document = self._read(None)  # a ledger that does not verify stops the start

    def _read(self, current: Ledger | None) -> tuple[Ledger, bytes]:
        try:
            stat = os.stat(self.path)
            document = self.path.read_bytes()
        except OSError as error:
            raise GovernanceError(f"{self.path}: cannot read the ledger ({error})") from None
        ledger = follow(current, document)
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return ledger, document

    def current(self) -> Ledger:
        """The newest ledger that verifies; a file that does not is logged and ignored until it is fixed."""
        with self._lock:
            try:
                stat = os.stat(self.path)
            except OSError:
                return self.ledger
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                try:
                    self.ledger, self.document = self._read(self.ledger)
                    log.info("governance: ledger head %s (%d entries)", self.ledger.head[:16], len(self.ledger.entries))
                except GovernanceError as error:
                    self._stamp = (stat.st_mtime_ns, stat.st_size)
                    log.error("governance: %s refused, the run keeps the ledger it had: %s", self.path, error)
            return self.ledger
