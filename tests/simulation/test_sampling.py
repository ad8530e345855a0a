from pfedlora.simulation import clients_per_round, sample_clients


def test_count_and_full_participation():
    assert clients_per_round(100, 0.1) == 10
    assert clients_per_round(50, 0.2) == 10
    assert clients_per_round(3, 0.01) == 1
    assert sample_clients(10, 1.0, seed=0, server_round=1) == list(range(10))


def test_sampling_is_seeded_per_round_and_without_replacement():
    rounds = [sample_clients(100, 0.1, seed=5, server_round=r) for r in range(1, 21)]
    assert rounds == [sample_clients(100, 0.1, seed=5, server_round=r) for r in range(1, 21)]
    assert all(len(set(s)) == 10 and s == sorted(s) and min(s) >= 0 and max(s) < 100 for s in rounds)
    assert len({tuple(s) for s in rounds}) > 15  # rounds differ
    assert rounds != [sample_clients(100, 0.1, seed=6, server_round=r) for r in range(1, 21)]
