"""A task whose loss kills its worker process once: the first call anywhere creates a marker
file holding the process id, then the process exits at once (as if killed); every later call
trains normally. Imported by Ray's workers by name (tests/local/test_distributed.py)."""

import os
from dataclasses import dataclass

from fedtier.tasks import ClientTask
from fedtier.tasks.base import TaskWrapper


@dataclass(frozen=True)
class DiesOnce(TaskWrapper):
    task: ClientTask
    marker: str

    def loss(self, model, batch, generator):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.task.loss(model, batch, generator)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)
