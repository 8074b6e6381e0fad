"""Executors: results are combined in task order, whatever the number of workers."""

from __future__ import annotations

import operator

import pytest

from genecorpus.executors import LocalExecutor, fold


class _MapOnly:
    """An executor with ``map`` only: ``fold`` falls back to reducing the list."""

    def map(self, stage, fn, tasks):  # type: ignore[no-untyped-def]
        return [fn(*args) for args in tasks]

    def start(self, modules):  # type: ignore[no-untyped-def]
        pass

    def close(self) -> None:
        pass


def _append(acc: list[int], x: int) -> list[int]:
    return [*acc, x]


@pytest.mark.parametrize("workers", [1, 2])
def test_fold_combines_in_task_order(workers: int) -> None:
    tasks = [(i, 3) for i in range(11)]  # pow(i, 3)
    seen: list[tuple[int, int]] = []
    ex = LocalExecutor(workers, progress=lambda stage, done, total: seen.append((done, total)))
    try:
        got = fold(ex, "t", pow, tasks, _append, initial=[])
        assert got == [i**3 for i in range(11)]
        assert seen[0] == (0, 11) and seen[-1] == (11, 11)
        assert fold(ex, "t", pow, [], _append, initial=[]) == []
        with pytest.raises(ZeroDivisionError) as raised:
            fold(ex, "t", operator.truediv, [(1, 1), (1, 0), (2, 1)], _append, initial=[])
        if workers > 1:  # the worker's traceback comes along as the cause
            assert "ZeroDivisionError" in str(raised.value.__cause__)
        assert fold(ex, "t", pow, tasks, _append, initial=[]) == [i**3 for i in range(11)]  # workers still serve
    finally:
        ex.close()
    assert fold(_MapOnly(), "t", pow, tasks, _append, initial=[]) == [i**3 for i in range(11)]
