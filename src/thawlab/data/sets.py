"""What every thawlab data set provides: a training set and named evaluation sets, batched as
(images, labels, sample indices).

The indices key the feature cache of frozen phases. The training order depends on (shuffle seed, epoch) only,
not on the global random state, so a run resumed from a checkpoint sees the same batches as an uninterrupted
one; Lightning calls `set_epoch` on the sampler each epoch.

Under DDP the samplers here split the data between ranks themselves (the Trainer runs with
use_distributed_sampler=False): training, each rank a strided share of the same permutation, equal in length
(the remainder of the permutation is dropped, as drop_last); evaluation, each rank every world-th sample and
nothing padded, so every sample is counted exactly once (Lightning's DistributedSampler repeats samples to even
out the ranks, and those repeats would be counted twice in the metrics).
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class Indexed(Dataset):
    """dataset[i] + (i,)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class EpochShuffle(Sampler):
    """A fresh permutation each epoch, drawn from (seed, epoch) alone; under DDP this rank's share of it."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        return iter(perm[: len(self) * self.world][self.rank :: self.world].tolist())


class Shard(Sampler):
    """Evaluation under DDP: samples rank, rank + world, ...; ranks may differ by one sample, none repeated."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self):
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))


class ImageSets(L.LightningDataModule):
    """A training set, and named evaluation sets for val and test.

    Evaluation sets are ordered: 'id' first, then 'ood/<name>' for each OOD set. The module reads
    `eval_sets(stage)` to name its metrics; dataloader index k is the k-th name. `train_transform_deterministic`
    says whether the feature cache may be used; `preprocess` (set by train() from the model's timm data config
    before setup) says what the model expects.
    """

    num_classes: int
    train_transform_deterministic = True  # a sample's training input never changes (no random augmentation)

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 256, num_workers: int = 0,
                 shuffle_seed: int = 0, pin_memory: bool | str = "auto", persistent_workers: bool | str = "auto"):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        # "auto": on when training on a GPU (pinned host memory: faster, asynchronous copies; workers kept
        # alive between epochs), off on a CPU where they only cost memory
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.sets: dict[str, dict[str, Dataset]] = {"val": {}, "test": {}}
        # evaluation sets whose labels cover only some of the classes (ImageNet-R, -A): set name -> those
        # classes (a LongTensor); the module restricts the logits to them (thawlab.metrics.restrict)
        self.class_subsets: dict[str, torch.Tensor] = {}

    def eval_sets(self, stage: str) -> list[str]:
        return list(self.sets[stage])

    def _world(self) -> tuple[int, int]:
        """(rank, number of ranks) of the Trainer this data module is attached to; (0, 1) outside one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _on_gpu(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None, train: bool = False) -> DataLoader:
        pin = self._on_gpu() if self.pin_memory == "auto" else bool(self.pin_memory)
        persistent = self.num_workers > 0 and (self._on_gpu() if self.persistent_workers == "auto"
                                               else bool(self.persistent_workers))
        # its own generator: creating an iterator draws a seed, which must not move the global random state
        return DataLoader(Indexed(dataset), batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=train and len(sampler) > batch_size, pin_memory=pin,
                          persistent_workers=persistent, generator=torch.Generator().manual_seed(self.shuffle_seed))

    def train_dataloader(self):
        rank, world = self._world()
        sampler = EpochShuffle(len(self.train_set), self.shuffle_seed, rank, world)
        return self._loader(self.train_set, self.batch_size, sampler, train=True)

    def eval_dataloaders(self, stage: str, distributed: bool = True) -> dict[str, DataLoader]:
        """distributed=False: whole sets, for evaluations one process runs alone (WiSE-FT's curve)."""
        rank, world = self._world() if distributed else (0, 1)
        return {name: self._loader(ds, self.eval_batch_size, Shard(len(ds), rank, world) if world > 1 else None)
                for name, ds in self.sets[stage].items()}

    def val_dataloader(self):
        return list(self.eval_dataloaders("val").values())

    def test_dataloader(self):
        return list(self.eval_dataloaders("test").values())
