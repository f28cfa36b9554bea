"""Micro-batches without padding waste: examples packed best-fit-decreasing into rows of at most max_length tokens.

Each example keeps its own `position_ids` (restarting at 0), and transformers reads a restart as a document
boundary, so no example attends to another. Concatenating a whole micro-batch into one row does the same, but its
attention (and, with SDPA, its dense mask) grows with the square of the micro-batch's total length; rows of at most
max_length keep it at the square of each row. When the micro-batch fits one row, the two are the same.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (one bin per item longer than it): longest
    first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b, space in enumerate(free) if space >= lengths[index]]
        if fits:
            best = min(fits, key=lambda b: free[b])
            bins[best].append(index)
            free[best] -= lengths[index]
        else:
            bins.append([index])
            free.append(capacity - lengths[index])
    return bins


class PackedCollator:
    """Collate {input_ids, labels} examples into rows packed best-fit-decreasing: input_ids, labels, position_ids.

    A row shorter than the longest is filled with pad tokens that are their own document (labels -100). An
    example's first label is -100 (as in TRL's padding-free collator): nothing before it in the row predicts it.
    """

    def __init__(self, pad_token_id: int, capacity: int):
        self.pad_token_id, self.capacity = pad_token_id, capacity

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rows = best_fit_decreasing([len(e["input_ids"]) for e in examples], self.capacity)
        width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in sorted(row):  # in data order within a row
                n = len(examples[i]["input_ids"])
                input_ids[r, start:start + n] = torch.as_tensor(examples[i]["input_ids"])
                labels[r, start:start + n] = torch.as_tensor(examples[i]["labels"])
                labels[r, start] = IGNORE_INDEX  # no example learns its first token from the one before it
                position_ids[r, start:start + n] = torch.arange(n)
                start += n
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
