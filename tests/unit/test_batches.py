"""Batches cut in the worker from large chunks (orchestrator/data/batches.py)."""

import torch

from orchestrator.data.batches import chunk_rows, slice_batches


def chunks_of(sizes: list[int]) -> list[dict]:
    out, start = [], 0
    for n in sizes:
        out.append({"x": torch.arange(start, start + n).float().unsqueeze(1), "y": torch.arange(start, start + n)})
        start += n
    return out


def test_every_row_once_in_full_batches_across_uneven_chunks():
    batches = list(slice_batches(chunks_of([10, 7, 13]), 4, drop_last=True))
    assert [len(b["y"]) for b in batches] == [4] * 7  # 30 rows: 7 full batches, the 2 left over dropped
    rows = torch.cat([b["y"] for b in batches])
    assert rows.tolist() == list(range(28))  # the remainder of a chunk is carried into the next, in order
    assert all(torch.equal(b["x"][:, 0].long(), b["y"]) for b in batches)  # columns stay aligned


def test_last_short_batch_kept_unless_drop_last():
    batches = list(slice_batches(chunks_of([5, 5]), 4, drop_last=False))
    assert [len(b["y"]) for b in batches] == [4, 4, 2]


def test_shuffle_permutes_within_chunks_and_repeats_with_the_seed():
    def order(seed):
        return torch.cat([b["y"] for b in slice_batches(chunks_of([16, 16]), 4, drop_last=True,
                                                       shuffle=torch.Generator().manual_seed(seed))]).tolist()

    first = order(1)
    assert sorted(first[:16]) == list(range(16)) and sorted(first[16:]) == list(range(16, 32))  # within each chunk
    assert first != list(range(32))
    assert order(1) == first and order(2) != first


def test_chunk_rows_are_whole_batches_and_cover_the_shuffle_window():
    assert chunk_rows(32, row_bytes=260) % 32 == 0 and chunk_rows(32, row_bytes=260) == 64 * 32  # small rows: the cap
    assert chunk_rows(32, row_bytes=600_000) == 32  # huge rows: one batch per chunk
    assert chunk_rows(32, row_bytes=600_000, shuffle_rows=100) == 128  # never below the shuffle window
