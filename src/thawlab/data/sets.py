"""What every thawlab data set provides: a training set and named evaluation sets, batched as
(images, labels, sample indices).

The indices key the feature cache of frozen phases. The training order depends on (shuffle seed, epoch) only,
not on the global random state, so a run resumed from a checkpoint sees the same batches as an uninterrupted
one; Lightning calls `set_epoch` on the sampler each epoch.
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
    """A fresh permutation each epoch, drawn from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


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
                 shuffle_seed: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.sets: dict[str, dict[str, Dataset]] = {"val": {}, "test": {}}
        # evaluation sets whose labels cover only some of the classes (ImageNet-R, -A): set name -> those
        # classes (a LongTensor); the module restricts the logits to them (thawlab.metrics.restrict)
        self.class_subsets: dict[str, torch.Tensor] = {}

    def eval_sets(self, stage: str) -> list[str]:
        return list(self.sets[stage])

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        # its own generator: creating an iterator draws a seed, which must not move the global random state
        return DataLoader(Indexed(dataset), batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=sampler is not None and len(dataset) > batch_size,
                          generator=torch.Generator().manual_seed(self.shuffle_seed))

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, EpochShuffle(len(self.train_set), self.shuffle_seed))

    def eval_dataloaders(self, stage: str) -> dict[str, DataLoader]:
        return {name: self._loader(ds, self.eval_batch_size) for name, ds in self.sets[stage].items()}

    def val_dataloader(self):
        return list(self.eval_dataloaders("val").values())

    def test_dataloader(self):
        return list(self.eval_dataloaders("test").values())
