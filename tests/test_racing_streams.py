"""racing/streams.py and its use in the runner: a variant's curve and trained weights do not
depend on which variants race beside it (issue 27, item 1)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lrdaccel.racing import race
from lrdaccel.racing.streams import RandomStream, stream_seed
from test_racing_runner import blobs as runner_blobs, mlp

QUICK = dict(batch_size=16, eval_batch_size=64, lr=1e-2, evaluations=3, calibration_batches=2, infer_repeats=1,
             infer_batch_size=8, freeze_embeddings=False, max_steps=6, progress=False)


def blobs(n: int, seed: int) -> TensorDataset:
    return runner_blobs(n, seed, spread=1.0)


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 4))


def _row(results: dict, name: str) -> dict:
    return next(row for row in results["seeds"][0]["variants"] if row["name"] == name)


def test_a_variant_trains_the_same_alone_and_beside_others():
    alone = race(dropout_mlp(), blobs(96, 0), blobs(40, 1), "original", seed=4, **QUICK)
    beside = race(dropout_mlp(), blobs(96, 0), blobs(40, 1), "original,original(lr=2),lrd(method=svd)", seed=4,
                  **QUICK)
    mine, theirs = _row(alone, "original"), _row(beside, "original")
    assert [p[2] for p in mine["curve"]] == [p[2] for p in theirs["curve"]]
    assert mine["param_digest"] == theirs["param_digest"]
    # dropout is drawn: the same variant under another seed trains differently
    other = race(dropout_mlp(), blobs(96, 0), blobs(40, 1), "original", seed=5, **QUICK)
    assert _row(other, "original")["param_digest"] != mine["param_digest"]


def test_a_stream_continues_where_it_left_off_and_restores_the_global_state():
    stream = RandomStream(0, "lrd", torch.device("cpu"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with stream.active():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with stream.active():
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(stream_seed(0, "lrd")))
    assert torch.equal(torch.cat([first, second]), expected)
    assert stream_seed(0, "lrd") != stream_seed(0, "original") and stream_seed(0, "lrd") != stream_seed(1, "lrd")
