"""Narrowing attention heads: the joint query/key and value/output reductions per head."""

import torch

from lrdaccel.factorize.heads import joint_query_key, joint_value_output

D, HEADS, SIZE, ROWS = 12, 3, 4, 400


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D, generator=generator, dtype=torch.float64) @ torch.randn(
        D, D, generator=generator, dtype=torch.float64) + 0.3
    return x, torch.cat([x, torch.ones(ROWS, 1, dtype=x.dtype)], 1), generator


def _scores(x1, query, key, rank):
    return [(x1 @ query[h * rank:(h + 1) * rank].T) @ (x1 @ key[h * rank:(h + 1) * rank].T).T for h in range(HEADS)]


def test_query_key_at_full_head_size_keeps_every_score():
    x, x1, generator = _inputs()
    query, key = (torch.randn(HEADS * SIZE, D + 1, generator=generator, dtype=torch.float64) for _ in range(2))
    new_query, new_key = joint_query_key(query, key, x1.T @ x1 / ROWS, HEADS, SIZE)
    for old, new in zip(_scores(x1, query, key, SIZE), _scores(x1, new_query, new_key, SIZE)):
        torch.testing.assert_close(new, old, rtol=1e-8, atol=1e-8)


def test_query_key_at_lower_rank_keeps_each_heads_scores_closer_than_dropping_dimensions():
    x, x1, generator = _inputs()
    query, key = (torch.randn(HEADS * SIZE, D + 1, generator=generator, dtype=torch.float64) for _ in range(2))
    new_query, new_key = joint_query_key(query, key, x1.T @ x1 / ROWS, HEADS, 2)
    assert new_query.shape == new_key.shape == (HEADS * 2, D + 1)
    kept = [h * SIZE + i for h in range(HEADS) for i in range(2)]
    for old, new, dropped in zip(_scores(x1, query, key, SIZE), _scores(x1, new_query, new_key, 2),
                                 _scores(x1, query[kept], key[kept], 2)):
        assert (new - old).norm() < (dropped - old).norm()


def test_value_output_is_exact_at_full_size_and_moves_the_value_bias_to_the_output():
    x, _, generator = _inputs()
    value = torch.randn(HEADS * SIZE, D, generator=generator, dtype=torch.float64)
    bias = torch.randn(HEADS * SIZE, generator=generator, dtype=torch.float64)
    output = torch.randn(5, HEADS * SIZE, generator=generator, dtype=torch.float64)
    reference = (x @ value.T + bias) @ output.T
    for rank in (SIZE, 2):
        new_value, new_output, shift = joint_value_output(value, bias, output, x.T @ x / ROWS, HEADS, rank)
        assert new_value.shape == (HEADS * rank, D) and new_output.shape == (5, HEADS * rank)
        torch.testing.assert_close(shift, output @ bias)
        error = ((x @ new_value.T) @ new_output.T + shift - reference).norm() / reference.norm()
        assert error < 1e-10 if rank == SIZE else 0 < error < 0.9
