"""The GPU path, measured: one table (a benchmark; `benchmarks/gpu.sh` runs it; the CPU variant runs in the tests).

Rows, each measured in a process of its own (a failure or a time-out is that row's cell, never the end of the
table; every row has a time budget, and the whole stays under --budget-s):

- `<model> plain` / `<model> thawlab`: training images/s of a plain PyTorch loop and of thawlab's real path
  (`trainer.fit` on the LightningModule that `build_module` makes, `build_trainer`'s Trainer) on the same
  network (`build_net`), the same named optimizer groups, AdamW and per-step LambdaLR; the data already in
  device memory in both (the same batches), so the ratio is the loop's own cost. bf16 autocast (Lightning's
  `bf16-mixed`; fp32 where the device has no bf16) and channels_last as thawlab's GPU defaults set them.
- the same with `trainer.compile=true` (torch.compile of the network; the plain loop compiles it too).
- `memory frozen` / `memory full`: torch.cuda.max_memory_allocated of a linear probe and of full fine-tuning
  through thawlab at the same batch (feature cache off, so the frozen backbone runs every step).
- `feature cache off` / `on`: a linear probe on the embedded benchmark's images at the model's size, seconds
  per epoch after the first (training and ID validation), as images/s of training.
- `imagefolder JPEGs`: thawlab's path on an imagefolder of generated JPEGs read by data-loader workers
  (decode, resized crop, flip, normalise), against the same model with the data in memory (the thawlab row).

Weights are random (no hub here): throughput and memory do not depend on their values. --device cpu runs the
same rows on tiny models for a few steps (tests/test_benchmarks.py), so the script cannot rot unseen.

    benchmarks/gpu.sh                  # one GPU: resnet50 and vit_base_patch16_224 at 224 px, under 8 minutes
    benchmarks/gpu.sh --device cpu     # tiny models, a few steps: the rows and the table, not the figures
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# per device: the models (name, extra overrides), input size, batch, warm-up and timed steps
PRESETS = {
    "cuda": {"models": {"resnet50": [], "vit_base_patch16_224": []}, "img_size": 224, "batch": 128,
             "warmup": 5, "steps": 30, "row_s": 90, "compile_row_s": 150, "budget_s": 440, "per_class": 100,
             "compile_backend": None},
    # a check that every row runs, not a measurement: one tiny model, compiled by dynamo with the eager backend
    "cpu": {"models": {"test_resnet": []}, "img_size": 32, "batch": 8, "warmup": 1, "steps": 2, "row_s": 120,
            "compile_row_s": 180, "budget_s": 600, "per_class": 5, "compile_backend": "eager"},
}


def rows(preset: dict) -> list[dict]:
    """Every row of the table, most wanted first: when the budget runs out, the last rows are the ones cut."""
    models = list(preset["models"])
    out = []
    for m in models:
        out += [{"id": f"{m} plain", "kind": "loop", "model": m, "impl": "plain"},
                {"id": f"{m} thawlab", "kind": "loop", "model": m, "impl": "thawlab"}]
    first = models[0]
    out += [{"id": f"{first} memory frozen", "kind": "loop", "model": first, "impl": "thawlab", "schedule": "frozen"},
            {"id": f"{first} memory full", "kind": "loop", "model": first, "impl": "thawlab", "schedule": "full"},
            {"id": f"{first} feature cache off", "kind": "cache", "model": first, "cache": False},
            {"id": f"{first} feature cache on", "kind": "cache", "model": first, "cache": True},
            {"id": f"{first} imagefolder JPEGs", "kind": "folder", "model": first}]
    for m in models:
        out += [{"id": f"{m} plain compile", "kind": "loop", "model": m, "impl": "plain", "compile": True},
                {"id": f"{m} thawlab compile", "kind": "loop", "model": m, "impl": "thawlab", "compile": True}]
    return out


# ---- one row, in its own process ---------------------------------------------------------------------------
def _cfg(row: dict, a, extra: list[str]):
    from common import compose_cfg

    accel = "gpu" if a.device == "cuda" else "cpu"
    return compose_cfg([f"backbone.name={row['model']}", "backbone.pretrained=false", *PRESETS[a.device]["models"][row["model"]],
                        f"schedule={row.get('schedule', 'full')}", f"data.img_size={a.img_size}",
                        f"data.batch_size={a.batch}", f"trainer.accelerator={accel}", "trainer.devices=1",
                        f"trainer.compile={str(bool(row.get('compile'))).lower()}", "trainer.max_epochs=1",
                        "trainer.enable_progress_bar=false", *extra])


class StepTimer:
    """Wall time from the start of step `warmup` to the end of step `total` (1-based count), the device
    synchronised only there: a sync every step would stall the GPU's queue in both loops alike."""

    def __init__(self, warmup: int, total: int, device: str):
        self.warmup, self.total, self.device = warmup, total, device
        self.step, self.start, self.end = 0, None, None

    def _sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def before(self):
        if self.step == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def after(self):
        self.step += 1
        if self.step == self.total:
            self._sync()
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"only {self.step} of {self.total} training steps ran (warm-up {self.warmup})")
        return self.end - self.start


def _lightning_timer(timer: StepTimer):
    import lightning as L

    class Hook(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            timer.before()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            timer.after()

    return Hook()


class Batches:
    """A fixed sequence of batches as a training loader (a plain list would be read by Lightning as a list of
    loaders)."""

    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def _device_batches(a, n_classes: int, channels_last: bool) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    dev = "cuda" if a.device == "cuda" else "cpu"
    distinct = []
    for _ in range(4):
        x = torch.randn(a.batch, 3, a.img_size, a.img_size, generator=g).to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        distinct.append((x, torch.randint(0, n_classes, (a.batch,), generator=g).to(dev),
                         torch.arange(a.batch, device=dev)))
    return [distinct[i % 4] for i in range(a.warmup + a.steps)]


def _precision(cfg) -> str:
    from thawlab.build import resolve_precision

    return resolve_precision(cfg.trainer)


def row_loop(row: dict, a) -> dict:
    """Images/s of thawlab's fit or of a plain loop, the data in device memory; the peak CUDA memory."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from thawlab.build import build_datamodule, build_module, build_net, build_trainer, prepare_for_device
    from thawlab.build import use_channels_last
    from common import plain_optimizer

    cfg = _cfg(row, a, ["data.ood=[]", "cache_features=false", "trainer.limit_val_batches=0",
                        f"trainer.limit_train_batches={a.warmup + a.steps}"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    precision, cl = _precision(cfg), use_channels_last(cfg)
    batches = _device_batches(a, dm.num_classes, cl)
    timer = StepTimer(a.warmup, a.warmup + a.steps, a.device)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if row["impl"] == "thawlab":
        prepare_for_device(cfg, net)
        module = build_module(cfg, net, dm)
        trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
        trainer.callbacks.append(_lightning_timer(timer))
        dm.train_dataloader = lambda: Batches(batches)  # the same device-resident batches as the plain loop
        trainer.fit(module, datamodule=dm)
        trainable = module.net.trainable_parameter_count()
    else:
        phases = build_module(cfg, net, dm).phases
        net.to(batches[0][0].device)
        prepare_for_device(cfg, net)
        net.apply_phase(phases[0])
        net.train()
        opt, sched = plain_optimizer(cfg, net, phases, len(batches))
        bf16 = precision.startswith("bf16")
        for x, y, _ in batches:
            timer.before()
            with torch.autocast(batches[0][0].device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            timer.after()
        trainable = net.trainable_parameter_count()
    out = {"images_s": a.steps * a.batch / timer.seconds(), "precision": precision, "channels_last": cl,
           "trainable": trainable}
    if a.device == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def row_cache(row: dict, a) -> dict:
    """A linear probe on the embedded benchmark at the model's input size: epochs after the first."""
    import lightning as L

    from thawlab.build import build_datamodule, build_module, build_net, build_trainer, prepare_for_device

    epochs = 3
    cfg = _cfg(row, a, ["schedule=frozen", "data.ood=[]", f"data.train_per_class={a.per_class}",
                        f"trainer.max_epochs={epochs}", f"cache_features={str(row['cache']).lower()}"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    prepare_for_device(cfg, net)
    module = build_module(cfg, net, dm)
    seconds = []

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
            seconds.append(time.perf_counter() - self.start)

    trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
    trainer.callbacks.append(EpochTimer())
    trainer.fit(module, datamodule=dm)
    later = statistics.median(seconds[1:])
    return {"images_s": len(dm.train_set) / later, "first_epoch_s": seconds[0], "epoch_s": later,
            "precision": _precision(cfg)}


def make_jpegs(root: Path, classes: int, per_class: int, size: int) -> None:
    """An imagefolder (train/ and test/) of random smooth JPEGs, written once."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                Image.fromarray(low).resize((size, size), Image.BILINEAR).save(d / f"{i}.jpg", quality=90)


def row_folder(row: dict, a) -> dict:
    """thawlab's path reading JPEGs through data-loader workers: training images/s after the warm-up."""
    import lightning as L
    import torch

    from thawlab.build import build_datamodule, build_module, build_net, build_trainer, prepare_for_device

    classes = 10
    # full batches for every step after data.val_fraction=0.01 of each class is held out for validation
    per_class = int((a.warmup + a.steps) * a.batch / classes * 1.02) + 2
    root = Path(tempfile.mkdtemp(prefix="thawlab-jpegs-"))
    make_jpegs(root, classes, per_class, a.img_size * 8 // 7)
    workers = min(8, max(1, (os.cpu_count() or 2) - 1))
    cfg = _cfg(row, a, ["data=imagefolder", f"data.root={root}", "data.val_fraction=0.01",
                        f"data.num_workers={workers}", "trainer.limit_val_batches=0",
                        f"trainer.limit_train_batches={a.warmup + a.steps}", "cache_features=false"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg.data, None)
    net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained=False)
    prepare_for_device(cfg, net)
    module = build_module(cfg, net, dm)
    timer = StepTimer(a.warmup, a.warmup + a.steps, a.device)
    trainer = build_trainer(cfg.trainer, None, False, enable_progress_bar=False)
    trainer.callbacks.append(_lightning_timer(timer))
    trainer.fit(module, datamodule=dm)
    out = {"images_s": a.steps * a.batch / timer.seconds(), "workers": workers, "augment": cfg.data.augment,
           "precision": _precision(cfg)}
    if a.device == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child(a) -> None:
    """Rows one after the other in this process (imports paid once): START before each, then ROW or FAIL."""
    import traceback

    if a.compile_backend:  # the CPU variant: dynamo's path without minutes of C++ code generation
        import torch

        compile_ = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, *args, **kw: compile_(self, *args, **{"backend": a.compile_backend,
                                                                                      **kw})
    for row in json.loads(a.child):
        print("START " + row["id"], flush=True)
        try:
            out = {"loop": row_loop, "cache": row_cache, "folder": row_folder}[row["kind"]](row, a)
            print("ROW " + json.dumps({"id": row["id"], **out}), flush=True)
        except Exception as e:  # noqa: BLE001 (one row's failure is its cell; the next row runs)
            traceback.print_exc()
            message = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            print("FAIL " + json.dumps({"id": row["id"], "error": message}), flush=True)
            if a.device == "cuda" and "CUDA" in message and "out of memory" not in message:
                sys.exit(3)  # the context may be broken: the next rows get a fresh worker
        finally:
            if a.device == "cuda":
                import gc

                import torch

                gc.collect()
                torch.cuda.empty_cache()


# ---- the table -----------------------------------------------------------------------------------------------
def run_rows(todo: list[dict], a, preset: dict, deadline: float) -> dict:
    """Rows in a worker process, each within its budget. A row over its budget, or one that takes the worker
    down (a crash, a CUDA error), is that row's cell; a fresh worker goes on with the rest."""
    import queue
    import threading

    results, pending = {}, list(todo)
    while pending:
        if deadline - time.perf_counter() < 15:
            for row in pending:
                results[row["id"]] = {"error": "skipped: the table's time budget is spent"}
            break
        err = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(pending), "--device", a.device, "--batch", str(a.batch),
             "--img-size", str(a.img_size), "--warmup", str(a.warmup), "--steps", str(a.steps),
             "--per-class", str(a.per_class), "--compile-backend", a.compile_backend or ""],
            stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"})
        lines: queue.Queue = queue.Queue()

        def read(out=proc.stdout, q=lines):
            for x in out:
                q.put(x)
            q.put(None)

        threading.Thread(target=read, daemon=True).start()
        current, started, cap, started_any = None, time.perf_counter(), preset["row_s"], False
        while True:
            left = min(cap - (time.perf_counter() - started), deadline - time.perf_counter())
            try:
                line = lines.get(timeout=max(0.1, left))
            except queue.Empty:
                row = current or pending[0]
                results[row["id"]] = {"error": f"over its time budget ({cap:.0f} s)",
                                      "wall_s": time.perf_counter() - started}
                print(f"  {row['id']}: {results[row['id']]['error']}", flush=True)
                proc.kill()
                break
            if line is None:  # the worker ended
                err.seek(0)
                tail = [x for x in err.read().splitlines() if x.strip()]
                why = (tail or [f"worker exited {proc.wait()}"])[-1][:160]
                if current is not None:  # it took this row down with it
                    results[current["id"]] = {"error": why}
                    print(f"  {current['id']}: {why}", flush=True)
                elif not started_any:  # it never got to a row (an import error): no worker will
                    for row in pending:
                        results[row["id"]] = {"error": f"the benchmark's worker failed to start: {why}"}
                    print(f"  worker failed to start: {why}", flush=True)
                break
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "START":
                started_any = True
                current = next(r for r in pending if r["id"] == rest)
                started = time.perf_counter()
                cap = preset["compile_row_s"] if current.get("compile") else preset["row_s"]
            elif kind in ("ROW", "FAIL"):
                out = json.loads(rest)
                results[out.pop("id")] = {**out, "wall_s": time.perf_counter() - started}
                r = results[current["id"]]
                print(f"  {current['id']}: " + (r["error"] if "error" in r else f"{r['images_s']:.1f} images/s")
                      + f" ({r['wall_s']:.0f} s)", flush=True)
                current = None
        proc.wait()
        err.close()
        pending = [r for r in pending if r["id"] not in results]
    return results


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--budget-s", type=float, help="the whole table (default: 450 on cuda)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--per-class", type=int, help="feature-cache rows: training images per class")
    ap.add_argument("--only", help="rows whose name contains this (e.g. resnet50)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager on --device cpu)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    preset = PRESETS[a.device]
    for k in ("batch", "img_size", "warmup", "steps", "per_class", "compile_backend"):
        if getattr(a, k) is None:
            setattr(a, k, preset[k])
    if a.child:
        return child(a)

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.sh: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run with --device cpu for the CPU "
              "variant", file=sys.stderr)
        sys.exit(2)
    budget = a.budget_s or preset["budget_s"]
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"gpu benchmark: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"batch {a.batch} at {a.img_size}x{a.img_size}, {a.warmup} warm-up + {a.steps} timed steps; random "
          f"weights; budget {budget:.0f} s", flush=True)
    todo = [r for r in rows(preset) if not a.only or a.only in r["id"]]
    results = run_rows(todo, a, preset, time.perf_counter() + budget)
    print()
    print(table(todo, results, preset))


def table(todo: list[dict], results: dict, preset: dict) -> str:
    lines = ["| row | images/s | vs reference | peak CUDA MiB | notes |", "|---|---|---|---|---|"]
    for row in todo:
        r = results[row["id"]]
        ref_id = reference(row)
        ref = results.get(ref_id, {}) if ref_id else {}
        ratio = (f"{r['images_s'] / ref['images_s']:.2f}x {ref_id}" if ref_id and "images_s" in r
                 and "images_s" in ref else "–")
        if row["id"].endswith("memory frozen") and "peak_mib" in r and "peak_mib" in results.get(
                row["id"].replace("frozen", "full"), {}):
            ratio = f"memory {r['peak_mib'] / results[row['id'].replace('frozen', 'full')]['peak_mib']:.2f}x full"
        if "error" in r:
            lines.append(f"| {row['id']} | error | – | – | {r['error']} |")
            continue
        notes = [r.get("precision", "")]
        if r.get("channels_last"):
            notes.append("channels_last")
        if "workers" in r:
            notes.append(f"{r['workers']} workers, augment={r['augment']}")
        if "first_epoch_s" in r:
            notes.append(f"epoch 1 {r['first_epoch_s']:.2f} s, later {r['epoch_s']:.3f} s")
        if "trainable" in r:
            notes.append(f"{r['trainable']:,} trainable")
        lines.append(f"| {row['id']} | {r['images_s']:.1f} | {ratio} | {fmt(r.get('peak_mib'), '.0f')} | "
                     f"{', '.join(n for n in notes if n)} |")
    return "\n".join(lines)


def reference(row: dict) -> str | None:
    """The row this one is compared with (its ratio column)."""
    m = row["model"]
    if row["kind"] == "loop" and row["impl"] == "thawlab" and "schedule" not in row:
        return f"{m} plain compile" if row.get("compile") else f"{m} plain"
    if row["kind"] == "loop" and row["impl"] == "plain" and row.get("compile"):
        return f"{m} plain"
    if row["kind"] == "cache" and row["cache"]:
        return f"{m} feature cache off"
    if row["kind"] == "folder":
        return f"{m} thawlab"
    return None


if __name__ == "__main__":
    main()
