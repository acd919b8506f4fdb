"""lrd(form=auto) in the race: planned on the race's calibration batches, one row per unit."""

import pytest
from torch import nn

import lrdaccel as lrd

from lrdaccel.racing import race
from lrdaccel.racing.variants import parse_variants
from test_racing_runner import QUICK, blobs, mlp


def test_the_auto_form_races_as_an_lrd_variant():
    trained = {}
    results = race(mlp(), blobs(96, 0), blobs(40, 1), "original,lrd(form=auto)", progress=False, trained=trained,
                   **QUICK, max_steps=2)
    model = trained["lrd(form=auto)"]
    ranks = results["variants"][1]["notes"]["ranks"]
    for name, rank in ranks.items():  # each changed layer is as its one row says: narrowed or factorized
        layer = model.get_submodule(name)
        if isinstance(layer, lrd.SVDLinear):
            assert layer.rank == rank
        else:
            assert type(layer) is nn.Linear and layer.out_features == rank
            assert model[int(name) + 2].in_features == rank  # the consumer reads the kept width
    assert results["variants"][1]["params"] <= 1.0


@pytest.mark.parametrize("variant, message", [
    ("lrd(form=auto,merge=true)", "form=auto does not combine with merge=true"),
    ("lrd(form=auto,allocate=sensitivity)", "form=auto does not combine with merge=true or allocate=sensitivity"),
    ("lrd(form=best)", "form"),
])
def test_bad_auto_options_are_refused(variant, message):
    with pytest.raises(ValueError, match=message):
        parse_variants("original," + variant)
