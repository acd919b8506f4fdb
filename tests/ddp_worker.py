"""Worker for tests/test_training_ddp.py, run as `torchrun --standalone --nproc_per_node=2 ddp_worker.py OUT_DIR`.

Part 1 drives SequentialFreezer.wrap_ddp by hand and checks, at every step, that the factors
frozen in the phase did not move and that every parameter is identical on both ranks. Part 2 runs
`lrdaccel.finetune` under the same process group. Each rank writes its findings and final
weights to OUT_DIR; the test compares them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

import lrdaccel as lrd
from lrdaccel import data
from lrdaccel.training.loop import finetune

STEPS_PER_PHASE = 3
EPOCHS = 2
BATCH = 16


def decomposed_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    lrd.decompose(model, ratio=1.5)
    return model


def standardised(train, test):
    images = train.tensors[0]
    mean, std = images.mean(), images.std()
    return tuple(TensorDataset((d.tensors[0] - mean) / std, d.tensors[1]) for d in (train, test))


def mean_loss(model: nn.Module, dataset) -> float:
    with torch.no_grad():
        x, y = dataset.tensors
        return F.cross_entropy(model(x), y).item()


def same_on_all_ranks(model: nn.Module) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(flat, other) for other in gathered)


def manual_loop(train, rank: int) -> dict:
    model = decomposed_mlp()
    freezer = lrd.SequentialFreezer(model, every_steps=STEPS_PER_PHASE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    loss_before = mean_loss(model, train)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    wrappers, last_wrapper = 0, None
    phases, frozen_moved, grads_on_frozen, out_of_sync = [], [], [], []
    snapshot, snapshot_phase = None, None
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        for start in range(0, len(indices), BATCH):
            net = freezer.wrap_ddp(model)
            if net is not last_wrapper:
                wrappers, last_wrapper = wrappers + 1, net
            if freezer.phase != snapshot_phase:
                snapshot_phase = freezer.phase
                phases.append(freezer.phase)
                frozen = set(freezer.report().frozen)
                snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen}
            x, y = train[torch.tensor(indices[start:start + BATCH])]
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            for name, p in model.named_parameters():
                if name in snapshot:
                    if not torch.equal(p, snapshot[name]):
                        frozen_moved.append(f"phase {freezer.phase}: {name}")
                    if p.grad is not None:
                        grads_on_frozen.append(name)
            if not same_on_all_ranks(model):
                out_of_sync.append(freezer.global_step)
            freezer.step()
    freezer.release_ddp()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT / f"manual_rank{rank}.safetensors")
    return {"phases": phases, "wrappers": wrappers, "frozen_moved": frozen_moved,
            "grads_on_frozen": grads_on_frozen, "out_of_sync_steps": out_of_sync,
            "loss_before": loss_before, "loss_after": mean_loss(model, train)}


def finetune_run(train, test, rank: int) -> dict:
    model = decomposed_mlp()
    history = finetune(model, train, test, epochs=EPOCHS, optimizer="adamw", lr=1e-2, batch_size=BATCH,
                       every_steps=STEPS_PER_PHASE, progress=False, checkpoint_dir=str(OUT / "ckpt"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT / f"finetune_rank{rank}.safetensors")
    return {"history": history.to_dict()}


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    train_set, test_set = standardised(data.load("digits", "train", limit=256), data.load("digits", "test", limit=64))
    result = {"world_size": dist.get_world_size(), "manual": manual_loop(train_set, rank),
              "finetune": finetune_run(train_set, test_set, rank)}
    (OUT / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()
