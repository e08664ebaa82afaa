"""Packing: every token of every document lands in exactly one row, in order, with the doc ids,
positions and loss mask a straightforward reference computes."""

from __future__ import annotations

import json

import numpy as np
import torch

from mm_moe.data.batch import Batch
from mm_moe.data.config import DataConfig, SourceConfig
from mm_moe.data.documents import Document
from mm_moe.data.packing import Packer
from tests.data_shards import texts, write_shards


def _docs(seed: int, count: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n = int(rng.integers(1, 40))  # some documents span several rows
        docs.append(Document(np.arange(n, dtype=np.int32) + 1000 * i, np.full(n, i % 2, np.uint8)))
    return docs


def _reference_rows(docs: list[Document], row_len: int, num_rows: int):
    """A plain loop: concatenate, cut, number the segments and positions token by token."""
    flat = [
        (int(t), int(m), k == 0) for d in docs for k, (t, m) in enumerate(zip(d.tokens, d.modality))
    ]
    rows = []
    for r in range(num_rows):
        chunk = flat[r * row_len : (r + 1) * row_len]
        doc, pos, d, p = [], [], -1, 0
        for k, (_, _, starts) in enumerate(chunk):
            if starts or k == 0:
                d, p = d + 1, 0
            doc.append(d)
            pos.append(p)
            p += 1
        rows.append(([t for t, _, _ in chunk], [m for _, m, _ in chunk], doc, pos))
    return rows, flat[num_rows * row_len :]


def test_rows_match_reference_and_nothing_is_lost_or_duplicated():
    docs, row_len = _docs(0, 30), 17
    packer, rows, pushed = Packer(row_len), [], 0
    for _ in range(20):
        while not packer.has_row():
            packer.push(docs[pushed])
            pushed += 1
        rows.append(packer.pop_row())
    want, leftover = _reference_rows(docs[:pushed], row_len, 20)
    for got, ref in zip(rows, want):
        assert [a.tolist() for a in got] == [list(x) for x in ref]
    # The packing buffer holds exactly the rest of the last document pushed.
    state = packer.state_dict()
    again = Packer(row_len)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.size == len(leftover) == packer.size
    all_tokens = np.concatenate([r[0] for r in rows] + [again._flat()[0]])
    assert np.array_equal(all_tokens, np.concatenate([d.tokens for d in docs[:pushed]]))


def test_whole_documents_keeps_every_document_that_fits_in_one_row():
    docs, row_len, pad = _docs(2, 60), 23, -1  # lengths 1..39: some fit, some cannot
    packer = Packer(row_len, whole_documents=True, pad_id=pad)
    rows = []
    for doc in docs:
        packer.push(doc)
        while packer.has_row():
            rows.append(packer.pop_row())
    tokens_RT = np.stack([r[0] for r in rows])
    doc_RT, pos_RT = np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows])
    # Nothing lost, duplicated or reordered: the tokens without padding are the documents.
    kept = np.concatenate([tokens_RT.ravel(), packer._flat()[0]])
    assert np.array_equal(kept[kept != pad], np.concatenate([d.tokens for d in docs]))
    cut = 0
    for i, d in enumerate(docs):
        where = np.argwhere(np.isin(tokens_RT, d.tokens))
        if len(where) < len(d.tokens):
            continue  # (partly) still in the buffer
        row_ids = set(where[:, 0].tolist())
        if len(d.tokens) <= row_len:
            assert len(row_ids) == 1, f"document {i} ({len(d.tokens)} tokens) was cut"
            (r,) = row_ids
            assert pos_RT[r][tokens_RT[r] == d.tokens[0]][0] == 0
        else:
            cut += 1
    assert cut > 0
    # Padding only ever fills the end of a row, as its own segment that no loss reads.
    for r in range(len(rows)):
        padded = tokens_RT[r] == pad
        if padded.any():
            first = int(np.argmax(padded))
            assert padded[first:].all() and doc_RT[r, first] != doc_RT[r, first - 1]
    valid_RT = tokens_RT != pad
    batch = Batch.from_tokens(tokens_RT, np.zeros_like(tokens_RT), doc_RT, pos_RT, valid_RT)
    assert not (batch.loss_mask_BS & torch.from_numpy(~valid_RT[:, 1:])).any()
    # Without the option: the same documents cut where the rows end, no padding.
    plain = Packer(row_len)
    for doc in docs:
        plain.push(doc)
    assert plain.size == sum(len(d.tokens) for d in docs) < tokens_RT.size + packer.size


def test_loss_mask_positions_and_doc_ids_in_a_batch():
    docs, row_len = _docs(1, 12), 9
    packer = Packer(row_len)
    rows = []
    for doc in docs:
        packer.push(doc)
        while packer.has_row():
            rows.append(packer.pop_row())
    tokens, modality, doc_ids, pos = (np.stack([r[i] for r in rows]) for i in range(4))
    batch = Batch.from_tokens(tokens, modality, doc_ids, pos, np.ones_like(tokens, bool))
    crossing = batch.doc_ids_BS[:, 1:] != batch.doc_ids_BS[:, :-1]
    assert not batch.loss_mask_BS[:, :-1][crossing].any()
    assert (
        batch.position_ids_BS[batch.doc_ids_BS != torch.roll(batch.doc_ids_BS, 1, 1)] == 0
    ).all()
    assert int(batch.position_ids_BS.max()) < row_len - 1


def test_loader_rows_are_the_documents_in_shard_order(tmp_path):
    """One stream over one text shard: the rows, concatenated, are the shard's documents
    tokenized in order, epoch after epoch (the shard order of one shard is trivial)."""
    samples = texts(7)
    pattern = write_shards(tmp_path, samples, per_shard=100)
    cfg = DataConfig(
        source="webdataset",
        seq_len=15,
        num_streams=1,
        num_workers=0,
        sources=[SourceConfig(pattern, "text")],
    )
    loader = cfg.build(0, 0, 1, 2, 4)
    v = loader.vocab
    rows = []
    for _ in range(12):
        for b in loader.next():
            rows += torch.cat([b.input_ids_BS, b.target_ids_BS[:, -1:]], 1).tolist()
    stream = [t for r in rows for t in r]
    one_epoch = [t for s in samples for t in [v.bos, *s["txt"].encode(), v.eos]]
    reference = one_epoch * (len(stream) // len(one_epoch) + 1)
    assert len(stream) > 2 * len(one_epoch)  # crossed two epoch boundaries
    assert stream == reference[: len(stream)]
