"""Hand-made packed batches that follow ARCHITECTURE.md's packed-batch contract exactly."""

from __future__ import annotations

import torch


def pack_rows(rows: list[list[tuple[int, list[int], list[int]]]], seq_len: int, pad_id: int = 0) -> dict:
    """rows: per row, a list of examples ``(task_id, prompt_ids, target_ids)``.

    labels are shifted within each example: position t predicts token t+1 of the example;
    -100 on prompt positions (except the last one, which predicts the first target token),
    on each example's last token and on padding.
    """
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    task_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    segment_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    seqlens = []
    for b, row in enumerate(rows):
        pos = 0
        for seg, (task, prompt, target) in enumerate(row):
            ids = prompt + target
            n = len(ids)
            assert pos + n <= seq_len
            input_ids[b, pos:pos + n] = torch.tensor(ids)
            task_ids[b, pos:pos + n] = task
            position_ids[b, pos:pos + n] = torch.arange(n)
            segment_ids[b, pos:pos + n] = seg
            for t in range(len(prompt) - 1, n - 1):
                labels[b, pos + t] = ids[t + 1]
            seqlens.append(n)
            pos += n
        if pos < seq_len:
            position_ids[b, pos:] = torch.arange(seq_len - pos)
            seqlens.append(seq_len - pos)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    return {"input_ids": input_ids, "labels": labels, "task_ids": task_ids, "position_ids": position_ids,
            "segment_ids": segment_ids, "cu_seqlens": cu, "max_seqlen": max(seqlens)}


def random_rows(gen: torch.Generator, B: int, seq_len: int, num_tasks: int, vocab: int,
                tasks: list[int] | None = None) -> list:
    """Random examples filling rows (with some padding); task i's targets are a function of
    its prompt so a model can learn them."""
    rows = []
    for _ in range(B):
        row, pos = [], 0
        while True:
            task = int(torch.randint(num_tasks, (1,), generator=gen)) if tasks is None else \
                tasks[int(torch.randint(len(tasks), (1,), generator=gen))]
            plen = int(torch.randint(2, 6, (1,), generator=gen))
            tlen = int(torch.randint(1, 4, (1,), generator=gen))
            if pos + plen + tlen > seq_len - 1:
                break
            prompt = [int(x) for x in torch.randint(3, vocab, (plen,), generator=gen)]
            target = [(prompt[0] + 7 * (task + 1) + i) % (vocab - 3) + 3 for i in range(tlen - 1)] + [2]
            row.append((task, prompt, target))
            pos += plen + tlen
        rows.append(row)
    return rows


class HandMadePipeline:
    """A TrainPipeline stand-in over random packed batches (deterministic, resumable)."""

    def __init__(self, num_tasks: int, task_names: list[str], seq_len: int, micro_batch_size: int, vocab: int,
                 seed: int = 0, rank: int = 0):
        self.num_tasks, self.task_names = num_tasks, task_names
        self.seq_len, self.B, self.vocab = seq_len, micro_batch_size, vocab
        self.seed, self.rank, self.drawn = seed, rank, 0

    def next_batch(self, task: str | None = None) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1000003 + self.rank * 7919 + self.drawn)
        self.drawn += 1
        tasks = None if task is None else [self.task_names.index(task)]
        return pack_rows(random_rows(gen, self.B, self.seq_len, self.num_tasks, self.vocab, tasks), self.seq_len)

    def rates(self, step: int) -> dict[str, float]:
        return {t: 1.0 / self.num_tasks for t in self.task_names}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])
