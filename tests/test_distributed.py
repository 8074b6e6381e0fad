"""Multi-process training and embedding: real ``torch.distributed`` processes (``gloo`` on 127.0.0.1),
started with ``python -m torch.distributed.run`` as a user starts ``torchrun``, against single-process
runs of the same global batch computed in the test's own process.

Each launched process runs tests/distributed_worker.py (or ``-m genecorpus``), one torch thread each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from kang_corpus import kang_corpus

from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError
from genecorpus.model.distributed import Process, shard_rows
from genecorpus.model.pretrain import pretrain
from genecorpus.model.sampling import split_batch, split_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKER = Path(__file__).with_name("distributed_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
# tiny settings (seconds per run); dropout 0 so that two processes can follow one exactly (see docs/model.md)
FAST = {"preset": "tiny", "max_length": 64, "val_cells": 24, "baseline_cells": 200, "dropout": 0.0, "seed": 3}
RTOL = 1e-5
"""Per-step losses and validation metrics of 2 processes against 1 (measured: ~2e-7, float32 sums in
another order over other padding widths)."""
LAUNCH_TIMEOUT = 120


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Kang 2018 PBMC cells as two datasets: 203 control (201 after QC: training) and 100
    IFN-β-stimulated cells (held out)."""
    return kang_corpus(tmp_path_factory.mktemp("ddp-corpus"), 203, 100, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"PYTHONPATH": os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "OMP_NUM_THREADS": "1", "GENECORPUS_NO_PROGRESS": "1", **extra})
    return env


def torchrun(n: int, *args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node n ARGS`` on 127.0.0.1 (``python -m torch.distributed.run``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *args]
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout, check=False)


def pretrain_processes(n: int, corpus: Path, out: Path, crash: dict[str, object] | None = None,
                       **settings: object) -> list[dict]:
    """Pretrain with ``n`` processes; each one's record (tests/distributed_worker.py; {} if it did not end)."""
    spec = {"corpus": str(corpus), "out": str(out), "settings": settings, "crash": crash}
    done = torchrun(n, str(WORKER), json.dumps(spec))
    assert (done.returncode == 0) == (crash is None), done.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) if Path(f"{out}.rank{r}.json").exists() else {}
            for r in range(n)]


def history(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["history"]


def train_rows(corpus: Path) -> np.ndarray:
    reader = CorpusReader.open(corpus)
    return split_cells(reader.lengths, reader.dataset_ids(), val_fraction=0.05, val_cells=24, seed=3).train_rows


def assert_same_run(a: dict, b: dict) -> None:
    """Per-step losses and every evaluation of two histories, within RTOL."""
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=RTOL)
    assert [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]]
    for ea, eb in zip(a["evals"], b["evals"], strict=True):
        for key in ("val_loss", "baseline_val_loss"):
            assert ea[key] == pytest.approx(eb[key], rel=RTOL)
        assert ea["n_masked"] == eb["n_masked"]
        for key in ("val_top1", "val_top10", "baseline_val_top1", "baseline_val_top10"):
            assert abs(ea[key] - eb[key]) <= 1.0 / ea["n_masked"] + 1e-12  # one tie may break otherwise


# ---------------------------------------------------------------- the pure parts

def test_split_batch_deals_every_cell_once_balanced_and_within_the_budget() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, world, accum = int(rng.integers(1, 40)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        lengths = rng.integers(1, 100, n)
        budget = int(rng.integers(100, 400)) if rng.random() < 0.5 else None
        shares = [split_batch(lengths, rank=r, world_size=world, grad_accum=accum, max_batch_tokens=budget)
                  for r in range(world)]
        everything = np.concatenate([p for share in shares for p in share] or [np.zeros(0, np.int64)])
        assert sorted(everything.tolist()) == list(range(n))  # every cell once, on one process
        sizes = [sum(len(p) for p in share) for share in shares]
        assert max(sizes) - min(sizes) <= 1
        for share in shares:
            if budget is None:
                assert len(share) == min(accum, sum(len(p) for p in share))
            for part in share:
                assert (np.diff(part) > 0).all()  # batch order inside a micro-batch
                assert len(part) == 1 or len(part) * lengths[part].max() <= (budget or 10**9)
    # one process, no accumulation, no budget: the batch as it is
    assert [p.tolist() for p in split_batch(np.array([5, 9, 1]))] == [[0, 1, 2]]
    assert [p.tolist() for p in shard_rows(np.arange(7), Process(1, 3))] == [1, 4]


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def two_process_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """2 processes × 4 cells, 10 steps, a checkpoint every 4."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    records = pretrain_processes(2, corpus, out, max_steps=10, eval_every=5, save_every=4, batch_size=4, **FAST)
    return out, records


def test_two_processes_follow_one_with_the_same_global_batch(corpus: Path, tmp_path: Path,
                                                            two_process_run: tuple[Path, list[dict]]) -> None:
    out, records = two_process_run
    settings = {"max_steps": 10, "eval_every": 5, **FAST}
    one = pretrain(corpus, tmp_path / "one", batch_size=8, **settings)
    accumulated = pretrain(corpus, tmp_path / "acc", batch_size=4, grad_accum=2, **settings)
    reference = history(tmp_path / "one")
    assert_same_run(history(out), reference)
    assert_same_run(history(tmp_path / "acc"), reference)
    assert records[0]["metrics"] == pytest.approx(one.metrics, rel=RTOL, abs=1.0 / one.info["evals"][-1]["n_masked"])
    assert records[1]["metrics"] == records[0]["metrics"]  # every process returns the run's result
    assert accumulated.metrics == pytest.approx(one.metrics, rel=RTOL, abs=1.0 / one.info["evals"][-1]["n_masked"])
    # the loss moved (a run that learned nothing would follow any other trivially)
    assert reference["train_loss"][-1] != reference["train_loss"][0]
    info = json.loads((out / "genecorpus_model.json").read_text())
    assert info["processes"] == {"world_size": 2, "backend": "gloo", "global_batch": 8, "batch_size": 4,
                                 "grad_accum": 1, "max_batch_tokens": None}
    assert one.info["processes"]["world_size"] == 1 and one.info["processes"]["backend"] is None


def test_each_process_trains_on_its_own_cells(corpus: Path, two_process_run: tuple[Path, list[dict]]) -> None:
    """The rows each process actually trained on (its DEBUG log): disjoint, together the global batches of a
    single-process sampler, 4 cells each."""
    from genecorpus.model.sampling import LengthGroupedSampler

    _, records = two_process_run
    rows = train_rows(corpus)
    lengths = CorpusReader.open(corpus).lengths
    sampler = LengthGroupedSampler(rows, lengths[rows], batch_size=8, seed=3)
    by_step = [{r["rank"]: dict(r["rows"])[step] for r in records} for step in range(10)]
    for step, shares in enumerate(by_step):
        mine = [sorted(x for part in shares[r] for x in part) for r in (0, 1)]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(sampler.next_batch().tolist()), step
        assert len(mine[0]) == len(mine[1]) == 4


def test_a_whole_epoch_covers_every_cell_once_and_keeps_to_the_token_budget(corpus: Path, tmp_path: Path) -> None:
    """An epoch of 3 global batches, one of them of one cell (so process 1 has nothing in it and joins the
    gradient exchange empty), micro-batches cut to 4 cells of 64 tokens: every training cell exactly once
    over both processes, no micro-batch beyond 256 padded tokens, losses those of one process without
    a budget."""
    rows = train_rows(corpus)
    assert len(rows) % 2 == 1 and (len(rows) - 1) % 4 == 0, len(rows)  # the corpus the test is built for
    per_process = (len(rows) - 1) // 4
    records = pretrain_processes(2, corpus, tmp_path / "two", max_steps=3, batch_size=per_process,
                                 max_batch_tokens=256, **FAST)
    trained = [x for r in records for _, parts in r["rows"] for part in parts for x in part]
    assert sorted(trained) == sorted(rows.tolist())  # every cell once, none on two processes
    lengths = np.minimum(CorpusReader.open(corpus).lengths, 64)
    parts = [part for r in records for _, step_parts in r["rows"] for part in step_parts]
    assert all(len(p) * lengths[p].max() <= 256 for p in parts)
    assert max(len(p) for p in parts) == 4  # the budget, not the batch size, cut them
    by_step = [[sum(len(part) for part in dict(r["rows"])[step]) for r in records] for step in range(3)]
    assert sorted(by_step) == [[1, 0], [per_process, per_process], [per_process, per_process]]
    # (the sampler shuffles the order of the batches: the one-cell batch can be any of the three; its cell went
    # to process 0, and process 1 joined that step's gradient exchange with nothing)
    pretrain(corpus, tmp_path / "one", max_steps=3, batch_size=2 * per_process, **FAST)
    assert_same_run(history(tmp_path / "two"), history(tmp_path / "one"))


def test_only_rank_0_writes_the_checkpoints_and_the_model(two_process_run: tuple[Path, list[dict]]) -> None:
    out, records = two_process_run
    rank0, rank1 = records[0]["writes"], records[1]["writes"]
    assert rank1 == []  # process 1 created, opened for writing, renamed and removed nothing in the model folder
    assert [r["ddp_alive"] for r in records] == [0, 0]  # released before the process group was left
    renames = [w for w in rank0 if w[0] == "os.rename" and w[1] == ".checkpoint.incomplete"]
    assert len(renames) == 3  # steps 4 and 8, and the end: each checkpoint written once
    assert ["open", "genecorpus_model.json"] in rank0 or any(w[1].endswith("genecorpus_model.json") for w in rank0)
    state = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["processes"]["world_size"] == 2 and state["processes"]["global_batch"] == 8
    assert len(state["rng_by_rank"]) == 2


RESUME = {"max_steps": 10, "eval_every": 5, "save_every": 4, **FAST}


def test_resume_with_one_process_continues_a_two_process_run(corpus: Path, tmp_path: Path,
                                                             two_process_run: tuple[Path, list[dict]]) -> None:
    """2 → 1: two processes stop at step 6 (checkpoint at 4); one process resumes with the batch the command
    gave (4, derived to 8 from the checkpoint's global batch) and ends on the uninterrupted trajectory."""
    reference_out, _ = two_process_run
    pretrain_processes(2, corpus, tmp_path / "a", crash={"step": 6, "rank": "all", "how": "raise"},
                       batch_size=4, **RESUME)
    assert json.loads((tmp_path / "a" / "checkpoint" / "training_state.json").read_text())["step"] == 4
    resumed = pretrain(corpus, tmp_path / "a", resume=True, batch_size=4, **RESUME)
    assert resumed.info["processes"]["batch_size"] == 8 and resumed.info["processes"]["world_size"] == 1
    assert_same_run(history(tmp_path / "a"), history(reference_out))
    with pytest.raises(ConfigError, match=r"global batch of 8 cells; with 1 process\(es\) give --batch-size × "
                                          r"--grad-accum = 8, e\.g\. --batch-size 8 --grad-accum 1"):
        pretrain(corpus, tmp_path / "a", resume=True, batch_size=4, grad_accum=3, **RESUME)


@pytest.mark.slow  # the other direction (2 → 1) runs in make test; this one in make test-all
def test_resume_with_two_processes_continues_a_one_process_run(corpus: Path, tmp_path: Path,
                                                               two_process_run: tuple[Path, list[dict]]) -> None:
    """1 → 2: one process stops at step 6 (checkpoint at 4); two processes resume with the command's batch
    (8, derived to 4 each) and end on the uninterrupted trajectory."""
    reference_out, _ = two_process_run

    class CrashError(RuntimeError):
        pass

    def crash_at_6(stage: str, done: int, total: int) -> None:
        if done == 6:
            raise CrashError

    with pytest.raises(CrashError):
        pretrain(corpus, tmp_path / "b", batch_size=8, progress=crash_at_6, **RESUME)
    records = pretrain_processes(2, corpus, tmp_path / "b", batch_size=8, resume=True, **RESUME)
    assert records[0]["info"]["processes"]["batch_size"] == 4
    assert_same_run(history(tmp_path / "b"), history(reference_out))


@pytest.mark.slow  # collective stops are also checked by the Ctrl-C test; this one (25 s) in make test-all
def test_time_limit_plan_and_stop_are_the_same_in_every_process(corpus: Path, tmp_path: Path) -> None:
    """Steps planned from a time limit: rank 0 measures and plans, both processes take the same steps (a
    process taking one step more would wait for the other forever) and return the same result."""
    records = pretrain_processes(2, corpus, tmp_path / "m", time_limit=0.3, batch_size=4,
                                 **{k: v for k, v in FAST.items() if k != "val_cells"})
    plan = records[0]["info"]["plan"]
    assert plan["planned_by"] == "time_limit" and plan["total_steps"] >= 3
    assert records[0]["info"]["training"]["stopped"] in ("planned_steps", "time_limit")
    assert records[0]["steps"] == records[1]["steps"] == records[0]["info"]["training"]["steps"]
    assert len(records[0]["rows"]) == len(records[1]["rows"])  # measuring steps and training steps alike
    assert [s for s, _ in records[0]["rows"]] == [s for s, _ in records[1]["rows"]]


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_to_torchrun_stops_every_process_after_the_step_with_a_checkpoint(
        corpus: Path, tmp_path: Path, signum: signal.Signals) -> None:
    """SIGINT to the launcher (what Ctrl-C sends it) or SIGTERM (what SLURM sends at the end of a job):
    torchrun passes it on, the processes agree to stop after the same step, rank 0 saves the checkpoint of
    that step, and the job ends in seconds (torchrun kills its processes 30 s after passing the signal)."""
    out = tmp_path / "m"
    spec = {"corpus": str(corpus), "out": str(out), "mark": 3,
            "settings": {"max_steps": 5000, "save_every": 10_000, "batch_size": 4, **FAST}}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(WORKER), json.dumps(spec)]
    launcher = subprocess.Popen(command, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not Path(f"{out}.step3").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert launcher.poll() is None, "the run ended before it could be interrupted"
        sent = time.monotonic()
        launcher.send_signal(signum)
        _, stderr = launcher.communicate(timeout=60)
        assert time.monotonic() - sent < 25  # stopped by the run, not by torchrun's SIGKILL after 30 s
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    state = json.loads((out / "checkpoint" / "training_state.json").read_text())
    assert 3 <= state["step"] < 5000
    assert f"pretraining stopped at step {state['step']} of 5000" in stderr  # both processes say where
    assert stderr.count(f"pretraining stopped at step {state['step']} of 5000") >= 2
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- embed

def test_embed_with_two_processes_equals_one_in_corpus_order(corpus: Path, tmp_path: Path,
                                                             two_process_run: tuple[Path, list[dict]]) -> None:
    from genecorpus.model.embed import EMBEDDING_KEY, embed_corpus

    model, _ = two_process_run
    one = embed_corpus(corpus, model, out=tmp_path / "one.h5ad", batch_size=8, max_length=64)
    done = torchrun(2, "-m", "genecorpus", "embed", str(corpus), "--model", str(model), "--out",
                    str(tmp_path / "two.h5ad"), "--batch-size", "8", "--max-length", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("embedded ") == 1  # rank 0 reports, once
    two = ad.read_h5ad(tmp_path / "two.h5ad")
    assert one is not None
    assert two.obs["corpus_row"].tolist() == list(range(CorpusReader.open(corpus).n_cells))
    assert two.obs_names.tolist() == one.obs_names.tolist()
    np.testing.assert_allclose(two.obsm[EMBEDDING_KEY], one.obsm[EMBEDDING_KEY], rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".two.h5ad*"))  # nothing half-written left by either process


def test_finetune_with_two_processes_follows_one_with_the_same_global_batch(
        corpus: Path, tmp_path: Path, two_process_run: tuple[Path, list[dict]]) -> None:
    """Fine-tuning under torchrun: 2 processes × 4 cells (and a token budget) against 1 process × 8, dropout 0 —
    the same validations, final loss, weights and test probabilities; rank 0 alone writes and reports."""
    import pandas as pd
    from safetensors.torch import load_file

    from genecorpus.model.finetune import finetune

    model, _ = two_process_run
    settings = {"max_steps": 6, "eval_every": 3, "dropout": 0.0, "max_length": 64, "seed": 5,
                "pretraining_cells": "warn", "baseline": False, "lr": 1e-3}
    finetune(corpus, tmp_path / "one", model=model, label="dataset_id", batch_size=8, **settings)
    done = torchrun(2, "-m", "genecorpus", "finetune", str(corpus), "--model", str(model), "--label", "dataset_id",
                    "--out", str(tmp_path / "two"), "--batch-size", "4", "--max-batch-tokens", "128",
                    "--max-steps", "6", "--eval-every", "3", "--dropout", "0", "--max-length", "64", "--seed", "5",
                    "--pretraining-cells", "warn", "--no-baseline", "--lr", "1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("classifier: ") == 1  # rank 0 reports, once
    one, two = (json.loads((tmp_path / x / "genecorpus_model.json").read_text()) for x in ("one", "two"))
    assert two["training"]["processes"]["world_size"] == 2 and two["training"]["processes"]["global_batch"] == 8
    run_one, run_two = one["training"]["runs"][0], two["training"]["runs"][0]
    assert [e["step"] for e in run_one["evals"]] == [e["step"] for e in run_two["evals"]] == [3, 6]
    assert [e["macro_f1"] for e in run_one["evals"]] == [e["macro_f1"] for e in run_two["evals"]]
    assert run_two["train_loss_last"] == pytest.approx(run_one["train_loss_last"], rel=RTOL)
    assert run_one["train_loss_first"] != pytest.approx(run_one["train_loss_last"], rel=1e-3)  # it did learn
    weights_one, weights_two = (load_file(tmp_path / x / "model.safetensors") for x in ("one", "two"))
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-4, atol=1e-6)
    pred_one, pred_two = (pd.read_csv(tmp_path / x / "predictions.csv") for x in ("one", "two"))
    assert pred_one["cell_id"].tolist() == pred_two["cell_id"].tolist()
    probs = [c for c in pred_one.columns if c.startswith("prob_")]
    np.testing.assert_allclose(pred_two[probs].to_numpy(), pred_one[probs].to_numpy(), rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob(".two*"))  # nothing half-written left by either process
    # predict: each process labels its share, rank 0 writes one table in corpus order
    from genecorpus.model.finetune import predict_cells

    alone = predict_cells(corpus, tmp_path / "two", batch_size=8)
    done = torchrun(2, "-m", "genecorpus", "predict", str(corpus), "--model", str(tmp_path / "two"), "--out",
                    str(tmp_path / "labelled.csv"), "--batch-size", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("labelled ") == 1
    together = pd.read_csv(tmp_path / "labelled.csv")
    assert together.corpus_row.tolist() == list(range(CorpusReader.open(corpus).n_cells))
    assert together.predicted.tolist() == alone.predicted.tolist()
    np.testing.assert_allclose(together[probs].to_numpy(), alone[probs].to_numpy(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- failures end the job

def test_a_bad_rendezvous_is_one_line_and_no_hang(corpus: Path, tmp_path: Path) -> None:
    """Rank 1 of 2 whose rank 0 never comes: one line naming what to check, within the timeout set."""
    env = launch_env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()), GENECORPUS_DIST_TIMEOUT="4")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "genecorpus", "pretrain", str(corpus), "--out",
                           str(tmp_path / "m"), "--preset", "tiny", "--max-steps", "2"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 could not join the process group at "
                                                   "127.0.0.1:"), done.stderr
    assert "MASTER_ADDR/MASTER_PORT" in lines[0] and "torchrun" in lines[0]
    assert time.monotonic() - began < 40
    assert not (tmp_path / "m").exists()


def test_one_process_dying_ends_the_job_without_a_hang(corpus: Path, tmp_path: Path) -> None:
    """Process 1 dies at step 2 (killed, no word): torchrun ends process 0 too, the job fails in seconds
    and leaves no model."""
    began = time.monotonic()
    records = pretrain_processes(2, corpus, tmp_path / "m", crash={"step": 2, "rank": 1, "how": "exit"},
                                 max_steps=50, batch_size=4, **FAST)
    assert time.monotonic() - began < LAUNCH_TIMEOUT
    assert records == [{}, {}]  # neither finished
    assert not (tmp_path / "m" / "model.safetensors").exists()
