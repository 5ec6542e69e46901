import torch
import torch.distributed as dist


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def test_pool_runs_real_gloo_all_reduce(rank_pool):
    assert rank_pool(3).run(_sum_ranks) == [6.0, 6.0, 6.0]
