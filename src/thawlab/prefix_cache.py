"""The frozen-prefix cache: in a phase whose bottom block groups are frozen (no gradient, eval mode) and whose
training inputs are deterministic, the activations at the end of the frozen prefix are computed once per sample
and the rest of the network trains on them.

Where the prefix ends is found model-agnostically, by running the backbone once on two samples with forward
hooks on every module (`find_split`): the cut is the module M, called once and returning a tensor, that finishes
last while every module started so far is frozen (its subtree has no trainable parameter and runs in eval mode)
or encloses M. Skipping the prefix means that every module finished by then (M included), except M's
enclosing containers, returns at once: M its cached output, the others a placeholder of their recorded shape
(buffers reused from step to step). Code between modules (ViT's class token and position embedding) runs on the
placeholders; its result must flow on only through M. That is checked, not assumed: the network is run again
with random placeholders and M's recorded output, and must give the same output as the plain forward, with no
module of the prefix called (a model whose later layers read a skipped value, e.g. a residual path around the
cut, differs and runs uncached with a one-line note). Also refused, with a note: a trainable parameter held by
an enclosing container (used by code between modules, maybe before the cut: a gradient would flow through the
prefix), and a prefix whose output is not the same twice in training mode (randomness outside any module).

A sample's activations are filled on first sight (a training or validation batch), stored on the CPU as raw
bytes: in RAM up to `cache_features.max_gb`, else in a memory-mapped file of the run directory up to
`cache_features.disk_gb` (removed when the phase ends), else the phase runs uncached with a note. The tables are
dropped at each phase boundary: the boundary moves (gradual unfreezing), and a group trained earlier may be
frozen later.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

GB = 1e9  # cache_features.max_gb / disk_gb: decimal gigabytes


class _Stop(Exception):
    """Raised by the hook on the cut module when only the prefix is wanted: nothing after it runs."""


def _structure(out):
    """(shape without the batch dim, dtype) of a tensor, a tuple/list of them; None: something else."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[1:]), out.dtype
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return type(out), tuple((tuple(o.shape[1:]), o.dtype) for o in out)
    return None


def _placeholder(struct, batch: int, device, make) -> torch.Tensor | tuple:
    if isinstance(struct[1], torch.dtype):
        return make((batch, *struct[0]), struct[1], device)
    return struct[0](make((batch, *s), d, device) for s, d in struct[1])


@dataclass
class Split:
    """Where a phase's frozen prefix ends in the backbone: the cut module, what is skipped, and its output."""
    cut: str  # module path in the backbone ("layer3", "blocks.5")
    skipped: dict[str, tuple]  # the outermost modules that return at once -> their output structure (cut excluded)
    shape: tuple[int, ...]  # the cut's output per sample
    dtype: torch.dtype
    channels_last: bool  # the cut's output in NHWC memory layout (trainer.channels_last): kept on replay
    prefix_modules: int = 0  # modules inside the prefix (all of them skipped)
    _buffers: dict = field(default_factory=dict)

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def placeholders(self, batch: int, device) -> dict[str, object]:
        """Zero tensors standing in for the skipped modules' outputs, made once per batch size and device."""
        key = (batch, str(device))
        if key not in self._buffers:
            if len(self._buffers) >= 2:  # an epoch has at most two batch sizes (its last batch): keep those
                self._buffers.pop(next(iter(self._buffers)))
            zeros = lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
            self._buffers[key] = {n: _placeholder(s, batch, device, zeros) for n, s in self.skipped.items()}
        return self._buffers[key]


class _Given(nn.Module):
    """Stands in for a skipped module during one forward: returns the given output, runs nothing (no hook of
    the module it replaces fires); other attributes read through to that module (its configuration)."""

    def __init__(self, original: nn.Module, value):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a child: the stand-in holds no parameters
        object.__setattr__(self, "_value", value)

    def forward(self, *args, **kwargs):
        return self._value

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextlib.contextmanager
def _patched(backbone: nn.Module, outputs: dict[str, object]):
    """Each named module replaced, in its parent, by a stand-in that returns its given output."""
    places = []
    for n in outputs:
        parent, _, child = n.rpartition(".")
        places.append((backbone.get_submodule(parent), child))
    originals = [p._modules[c] for p, c in places]
    try:
        for (p, c), original, value in zip(places, originals, outputs.values()):
            p._modules[c] = _Given(original, value)
        yield
    finally:
        for (p, c), original in zip(places, originals):
            p._modules[c] = original


def run_prefix(backbone: nn.Module, cut: str, x: torch.Tensor) -> torch.Tensor:
    """The cut module's output on x: the backbone runs up to it and stops there."""
    got = {}

    def stop(module, args, out):
        got["out"] = out
        raise _Stop

    handle = backbone.get_submodule(cut).register_forward_hook(stop)
    try:
        with torch.no_grad():
            backbone(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["out"]


def run_suffix(backbone: nn.Module, split: Split, x: torch.Tensor, cut_out: torch.Tensor):
    """The backbone's output with the prefix skipped: the cut returns cut_out, its predecessors placeholders."""
    outputs = {**split.placeholders(len(x), x.device), split.cut: cut_out}
    with _patched(backbone, outputs):
        return backbone(x)


def _frozen_modules(backbone: nn.Module) -> set[str]:
    """Modules whose whole subtree has no trainable parameter and runs in eval mode."""
    out = set()
    for name, m in backbone.named_modules():
        if not any(p.requires_grad for p in m.parameters()) and not any(c.training for c in m.modules()):
            out.add(name)
    return out


def find_split(backbone: nn.Module, x: torch.Tensor) -> Split | str:
    """The frozen prefix of the backbone as it is now (requires_grad and modes of the current phase), found and
    checked on the inputs x (two samples are enough); a one-line reason where it cannot be cached."""
    frozen = _frozen_modules(backbone)
    if "" in frozen:
        return "the whole backbone is frozen (the feature cache's case)"
    names = {m: n for n, m in backbone.named_modules()}
    events: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    outs: dict[str, object] = {}

    def pre(module, args):
        n = names[module]
        calls[n] = calls.get(n, 0) + 1
        events.append(("start", n))

    def post(module, args, out):
        n = names[module]
        events.append(("end", n))
        outs[n] = out

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    was_training = backbone.training
    modes = {n: m.training for n, m in backbone.named_modules()}
    try:
        # eval mode and no grad: no BatchNorm statistic moves, no random number is drawn (the run stays as it was)
        backbone.eval()
        with torch.no_grad():
            reference = backbone(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in backbone.named_modules():
            m.training = modes[n]
        backbone.training = was_training
    start = {n: i for i, (kind, n) in reversed(list(enumerate(events))) if kind == "start"}
    end = {n: i for i, (kind, n) in enumerate(events) if kind == "end"}

    def encloses(a: str, b: str) -> bool:  # module a holds module b
        return a == "" or b.startswith(a + ".")

    cut = None
    for n in sorted(end, key=end.get):  # the latest-finishing valid cut wins
        if not n or n not in frozen or calls[n] != 1 or not isinstance(outs[n], torch.Tensor):
            continue
        if all(s >= end[n] or m in frozen or encloses(m, n) for m, s in start.items()):
            cut = n
    if cut is None:
        return "no module closes a frozen prefix (the first block group trains)"
    enclosing = [m for m in names.values() if encloses(m, cut)]
    held = [f"{m}.{p}".lstrip(".") for m in enclosing for p, t in backbone.get_submodule(m).named_parameters(
        recurse=False) if t.requires_grad]
    if held:
        return f"trainable parameter {held[0]} is held by a module around the cut {cut}"
    # A trainable parameter of a module no hook saw run (its forward called directly, its weight used by a
    # parent: ReFT's `source` Linear) is used somewhere inside the nearest module that did run; if that one
    # started before the cut, the parameter may be used before it and would lose its gradient.
    def nearest_run(m: str) -> str:
        while m not in start:
            m = m.rpartition(".")[0]
        return m

    unseen = [f"{m}.{p}".lstrip(".") for m, mod in backbone.named_modules() if m not in start
              and start.get(nearest_run(m), 0) < end[cut]
              for p, t in mod.named_parameters(recurse=False) if t.requires_grad]
    if unseen:
        return f"trainable parameter {unseen[0]} may be used before {cut} (its module is not run as a module)"
    skipped = [m for m in end if end[m] <= end[cut] and not encloses(m, cut) and m != cut]
    outer = [m for m in skipped if not any(encloses(o, m) for o in skipped if o != m) and not encloses(cut, m)]
    structs = {m: _structure(outs[m]) for m in outer}
    odd = [m for m in outer if structs[m] is None or calls[m] != 1]
    if odd:
        return f"module {odd[0]} before the cut {cut} returns no tensor or runs more than once"
    out = outs[cut]
    split = Split(cut, structs, tuple(out.shape[1:]), out.dtype,
                  out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last),
                  prefix_modules=sum(len(list(backbone.get_submodule(m).modules())) for m in [*outer, cut]))
    return _verify(backbone, split, x, out, reference)


def _verify(backbone: nn.Module, split: Split, x, cut_out, reference) -> Split | str:
    """The skipped forward must give the plain forward's output from the cut's output alone (random values in
    every placeholder), without calling any module of the prefix; and the prefix, run twice in the current
    (training) mode, must give the same output (no randomness outside the frozen modules)."""
    gen = torch.Generator(device=x.device).manual_seed(0)  # its own stream: the run's random state is untouched

    def noise(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen, device=device).to(dtype)
        return torch.zeros(shape, dtype=dtype, device=device)

    outputs = {n: _placeholder(s, len(x), x.device, noise) for n, s in split.skipped.items()}
    inside = [m for n in [*split.skipped, split.cut] for m in backbone.get_submodule(n).modules()]
    ran = []
    handles = [m.register_forward_pre_hook(lambda *a: ran.append(1)) for m in inside]
    modes = {n: m.training for n, m in backbone.named_modules()}
    try:
        backbone.eval()
        with torch.no_grad(), _patched(backbone, {**outputs, split.cut: cut_out}):
            replay = backbone(x)
    except Exception as e:  # e.g. code between modules that cannot take a stand-in's output
        return f"the forward fails with the prefix up to {split.cut} skipped ({type(e).__name__}: {e})"
    finally:
        for h in handles:
            h.remove()
        for n, m in backbone.named_modules():
            m.training = modes[n]
    if ran:
        return f"modules of the prefix up to {split.cut} are called from outside it"
    same = isinstance(replay, torch.Tensor) and torch.allclose(replay, reference, rtol=1e-4, atol=1e-5, equal_nan=True)
    if not same:
        return f"the output depends on more than {split.cut}'s output (a path around the cut)"
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(1)
        a = run_prefix(backbone, split.cut, x)
        torch.manual_seed(2)
        b = run_prefix(backbone, split.cut, x)
    if not torch.equal(a, b):
        return f"the prefix up to {split.cut} is random in training mode"
    return split


class Table:
    """One data set's activations at the cut by sample index, as raw bytes: a tensor in RAM, or a memory-mapped
    file. A row is filled once; `seen` says which are."""

    def __init__(self, size: int, split: Split, path: Path | None):
        self.split, self.path = split, path
        n = split.sample_bytes
        if path is None:
            self.data = torch.empty((size, n), dtype=torch.uint8)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="w+", shape=(size, n)))
        self.seen = torch.zeros(size, dtype=torch.bool)

    def put(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        # in the split's dtype: a fill under another autocast context must not write rows of another width
        rows = out.detach().to(self.split.dtype).contiguous().reshape(len(out), -1).view(torch.uint8)
        self.data[idx.cpu()] = rows.cpu()
        self.seen[idx.cpu()] = True

    def get(self, idx: torch.Tensor, device) -> torch.Tensor:
        s = self.split
        out = self.data[idx.cpu()].to(device, non_blocking=True).view(s.dtype).view(len(idx), *s.shape)
        return out.contiguous(memory_format=torch.channels_last) if s.channels_last else out


class PrefixCache:
    """The frozen prefix of the current phase and its activation tables (see the module docstring).

    begin_phase() at each epoch start; prepare() with a training batch at the first step of a phase finds the
    split and decides where the tables live; logits() then serves training and validation batches."""

    def __init__(self, max_gb: float, disk_gb: float, note: Callable[[str], None] | None = None):
        self.max_gb, self.disk_gb = max_gb, disk_gb
        self.note = note or (lambda line: print(line, file=sys.stderr))
        self.phase: int | None = None
        self.split: Split | None = None
        self.prepared = False
        self.tables: dict[str, Table] = {}
        self.directory: Path | None = None  # memory-mapped tables: <run dir>/prefix_cache
        self.on_disk = False

    def clear(self) -> None:
        self.tables.clear()  # drops the memory maps before their files go
        if self.directory is not None and self.on_disk:
            shutil.rmtree(self.directory, ignore_errors=True)
            with contextlib.suppress(OSError):  # prefix_cache/ itself, once no rank's directory is left in it
                self.directory.parent.rmdir()
        self.split, self.prepared, self.on_disk = None, False, False

    def begin_phase(self, index: int) -> None:
        if index != self.phase:
            self.clear()
            self.phase = index

    @property
    def active(self) -> bool:
        return self.split is not None

    def prepare(self, net, x: torch.Tensor, samples: int, directory: Path, phase_name: str, rank: int = 0) -> None:
        """Find this phase's split on the first two samples of x and place its tables (samples: every sample of
        the training and validation sets, what the tables may come to hold)."""
        self.prepared = True
        found = find_split(net.backbone, x[:2])
        tell = self.note if rank == 0 else (lambda line: None)
        if isinstance(found, str):
            if "feature cache" not in found:
                tell(f"prefix cache, phase {phase_name}: off, {found}")
            return
        need = found.sample_bytes * samples
        where = f"{need / GB:.3g} GB in RAM"
        if need > self.max_gb * GB:
            directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(directory).free
            if need > self.disk_gb * GB or need > free:
                tell(f"prefix cache, phase {phase_name}: off, {need / GB:.3g} GB of activations at {found.cut} exceed "
                     f"cache_features.max_gb={self.max_gb:g} (RAM) and "
                     + (f"disk_gb={self.disk_gb:g}" if need > self.disk_gb * GB else f"the {free / GB:.3g} GB free")
                     + f" in {directory}: runs uncached")
                return
            self.on_disk, self.directory = True, directory / f"rank{rank}"
            where = f"{need / GB:.3g} GB in a memory-mapped file under {self.directory}"
        self.split = found
        tell(f"prefix cache, phase {phase_name}: {found.prefix_modules} modules up to {found.cut} run once per sample; "
             f"output {tuple(found.shape)} {str(found.dtype).removeprefix('torch.')}, at most {where}")

    def features(self, net, key: str, size: int, x: torch.Tensor, idx: torch.Tensor):
        """The backbone's output for a batch: the prefix from the table (computed for samples not seen before),
        the rest of the backbone run on it."""
        split = self.split
        if key not in self.tables:
            path = self.directory / f"{key.replace('/', '-')}.bin" if self.on_disk else None
            self.tables[key] = Table(size, split, path)
        table = self.tables[key]
        new = ~table.seen[idx.cpu()]
        if bool(new.all()):  # the whole batch is new (a phase's first epoch): run its prefix as one batch
            cut_out = run_prefix(net.backbone, split.cut, x)
            table.put(idx, cut_out)
        else:
            if bool(new.any()):
                mask = new.to(x.device)
                table.put(idx[mask], run_prefix(net.backbone, split.cut, x[mask]))
            cut_out = table.get(idx, x.device)
        return run_suffix(net.backbone, split, x, cut_out)
