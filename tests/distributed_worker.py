"""One process of a multi-process ``pretrain``, started by tests/test_distributed.py under
``python -m torch.distributed.run``; records what this process did in ``OUT.rank<R>.json``.

Argument: a JSON object ``{"corpus", "out", "settings": {...}, "crash": {"step", "rank", "how"}, "mark"}``
(``mark``: rank 0 creates ``OUT.step<mark>`` when it has done that many steps).
What it records, without replacing any part of the run:

- ``rows``: the corpus rows of each micro-batch this process trained on, per step (the loop's DEBUG log);
- ``writes``: every file this process opened for writing, renamed, replaced, created or removed under
  ``out`` (Python's audit events, which ``open``, ``torch.save``, ``os.rename``… raise);
- ``metrics``, ``steps``, ``info``: what ``pretrain`` returned in this process;
- ``ddp_alive``: ``DistributedDataParallel`` objects still in memory after it returned.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from genecorpus.model.pretrain import pretrain

    rank = int(os.environ["RANK"])
    out = str(Path(spec["out"]).resolve())
    record: dict[str, object] = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "rows": [],
                                 "writes": []}
    writes: list[list[str]] = record["writes"]  # type: ignore[assignment]
    watched = ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree",
               "os.unlink")

    def audit(event: str, args: tuple[object, ...]) -> None:
        if event not in watched or not args:
            return
        path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
        if not (path == out or path.startswith(out + os.sep)):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing:
                return
        writes.append([event, os.path.relpath(path, out)])

    sys.addaudithook(audit)

    class Rows(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            if "micro-batch rows" in rec.msg:
                step, _, rows = rec.args  # type: ignore[misc]
                record["rows"].append([step, json.loads(rows)])  # type: ignore[union-attr]

    log = logging.getLogger("genecorpus.model.pretrain")
    log.setLevel(logging.DEBUG)
    log.addHandler(Rows())
    crash = spec.get("crash")

    def progress(stage: str, done: int, total: int) -> None:
        if spec.get("mark") and done == spec["mark"] and rank == 0:  # tells the test the steps are under way
            Path(f"{spec['out']}.step{done}").touch()
        if crash and done == crash["step"] and crash["rank"] in (rank, "all"):
            if crash["how"] == "exit":  # the process dies without a word, as a killed one would
                os._exit(3)
            raise SystemExit(3)

    result = pretrain(spec["corpus"], spec["out"], progress=progress, **spec["settings"])
    # a DistributedDataParallel wrapper still alive would hold the (destroyed) process group until the
    # interpreter's exit, whose teardown of gloo's threads then aborts the process now and then
    ddp = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    record.update({"metrics": result.metrics, "steps": result.steps, "info": result.info, "ddp_alive": ddp})
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
