"""`thawlab-train`: the Hydra entry point. Compose, build, fit phase by phase, test the checkpoint selected on
ID validation on every set, write results.json (and `done` last)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from thawlab import config, sweep, threads
from thawlab.errors import ThawlabError
from thawlab.loggers import finish_wandb, log_final_metrics
from thawlab.results import DONE, RunRecord, read_results
from thawlab.resume import Interrupted, check_matches, interruptible, is_resume_key, resume_argv, resume_event
from thawlab.resume import resumed_job


def conf_dir() -> str:
    """conf/ inside the installed package (a wheel carries it), else the checkout's top-level conf/."""
    packaged = Path(__file__).parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


def job_of_hydra() -> dict:
    """What a run needs to know about its Hydra job; plain data, so a DDP rank process gets it too."""
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    job = {"run_dir": hc.runtime.output_dir, "overrides": [o for o in hc.overrides.task if not is_resume_key(o)],
           "name": hc.job.override_dirname or hc.job.name,
           "group": Path(hc.sweep.dir).name if multirun else "single", "multirun": multirun}
    resumed = resumed_job(job["run_dir"])  # --resume: the run's identity as first launched
    return {**job, **{k: resumed[k] for k in ("overrides", "name", "group")}} if resumed else job


def train(cfg: DictConfig) -> dict:
    """The Hydra task: one job (a single run, or one job of a sweep). A DDP job this process has to start
    itself is supervised here and runs in rank processes of its own (thawlab.ranks)."""
    from thawlab import ranks

    job = job_of_hydra()
    run_dir = Path(job["run_dir"])
    if (run_dir / DONE).exists():  # a finished run is never touched again
        if job["multirun"]:  # a relaunched sweep: this job finished before
            print(f"skipping {run_dir.name}: done ({run_dir / DONE})", file=sys.stderr)
            return read_results(run_dir)["metrics"]
        raise ThawlabError(f"{run_dir} already finished ({DONE} marker); its results are kept. To run the "
                           f"experiment again, start a new run (another hydra.run.dir)")
    # a resume must continue the experiment its checkpoint belongs to: checked before anything is written
    ckpt_path = resume_path(cfg.ckpt_path, run_dir, job["multirun"])
    if ckpt_path is not None:
        job["resumed"] = resume_event(run_dir, check_matches(OmegaConf.to_container(cfg, resolve=True),
                                                             ckpt_path)["epoch"])
    job["threads"] = set_threads(cfg, job)  # printed by run() once the config has passed its checks
    with interruptible():
        n = ranks.must_start_ranks(cfg)
        if not n:
            return run(cfg, job)
        record = new_record(cfg, job)
        try:
            _prepare(cfg)  # once, here: bad input is one line before any rank starts; the cache is filled once
            ranks.launch(cfg, job, n, entry=run)  # each rank process runs this job through run()
        except BaseException as e:
            _interrupted(e, cfg, run_dir)
            _mark_failed(record, e)
            raise
    return read_results(run_dir)["metrics"]


def set_threads(cfg: DictConfig, job: dict) -> str:
    """A sweep job's share of the cores (thawlab.threads); the ranks it starts inherit OMP_NUM_THREADS.
    Returns the line that says so."""
    from thawlab import ranks

    try:  # DDP ranks on this machine share its cores too; a bad trainer.devices is reported by the checks
        per_job = ranks.world_size(cfg) // int(cfg.trainer.get("num_nodes", 1))
    except (ThawlabError, TypeError, ValueError):
        per_job = 1
    launcher = OmegaConf.to_container(HydraConfig.get().launcher, resolve=False) if job["multirun"] else {}
    plan = threads.plan(multirun=job["multirun"], launcher=launcher, processes_per_job=per_job, env=os.environ)
    return plan.line(threads.apply(plan))


def new_record(cfg: DictConfig, job: dict, write: bool = True) -> RunRecord:
    record = RunRecord(Path(job["run_dir"]), OmegaConf.to_container(cfg, resolve=True), cfg.seed,
                       overrides=job["overrides"], write=write)
    if job.get("resumed"):
        record.payload["resumed"] = job["resumed"]
    return record


def _interrupted(e: BaseException, cfg: DictConfig, run_dir: Path) -> None:
    if isinstance(e, Interrupted):
        e.describe(run_dir, cfg.trainer.max_epochs)


def _prepare(cfg: DictConfig) -> None:
    from thawlab import ranks
    from thawlab.build import build_datamodule, check_config
    from thawlab.pretrain import source_weights

    check_config(cfg)
    ranks.check(cfg)
    dm = build_datamodule(cfg.data, None, shuffle_seed=cfg.seed)
    dm.prepare_data()  # checks files, downloads once
    if "oracle" in _rules(cfg):  # its OOD validation sets are known once the sets are built: before any rank starts
        from thawlab.data.preprocess import Preprocess
        from thawlab.selection import check_ood_validation

        dm.preprocess = Preprocess(img_size=cfg.data.img_size)  # the sets' names alone: any preprocessing will do
        dm.setup("fit")
        check_ood_validation(_rules(cfg), dm.eval_sets("val"), _data_name(cfg))
    if cfg.backbone.pretrained == "source":
        source_weights(cfg)


def error_line(e: BaseException) -> str:
    """An error as results.json states it: an interruption in its own words (they say how to resume)."""
    return str(e) if isinstance(e, Interrupted) else f"{type(e).__name__}: {e}"


def _mark_failed(record: RunRecord, e: BaseException) -> None:
    """results.json of a DDP job whose rank failed: rank 0's record (its trace), with the root cause."""
    path = record.run_dir / "results.json"
    try:
        written = json.loads(path.read_text())
        if written.get("status") == "failed":
            record.payload.update({k: v for k, v in written.items() if k in ("trace", "distributed")})
    except (OSError, ValueError):
        pass
    record.fail(error_line(e))


def run(cfg: DictConfig, job: dict) -> dict:
    """Compose, build, fit phase by phase, test the selected checkpoint, write results.json (rank 0)."""
    # torch, lightning and timm are imported here, not at the top: `--help`, `--cfg` and config errors
    # answer in a second instead of the five that importing them takes
    from thawlab import ranks

    rank = ranks.global_rank()
    import lightning as L

    from thawlab.build import build_datamodule, build_module, build_net, build_trainer, check_config, classnames_of
    from thawlab.build import build_monitor, console, prepare_for_device, print_auto_lr, print_metrics
    from thawlab.build import print_partition, print_wise
    from thawlab.pretrain import source_weights
    from thawlab.resume import identity, signals_deferred
    from thawlab.selection import check_ood_validation

    run_dir = Path(job["run_dir"])
    record = new_record(cfg, job, write=rank == 0)
    say = console.print if rank == 0 else (lambda *a, **k: None)
    module, failed = None, True
    try:
        check_config(cfg)
        ranks.check(cfg)
        if job.get("threads"):
            say(job["threads"])
        ckpt_path = resume_path(cfg.ckpt_path, run_dir, job["multirun"])
        if ckpt_path is None and rank == 0:  # a fresh start: checkpoints of an earlier attempt must not linger
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        L.seed_everything(cfg.seed, workers=True, verbose=rank == 0)
        dm = build_datamodule(cfg.data, None, shuffle_seed=cfg.seed)  # bad data options fail before pretraining
        # downloads (data.download=true) and checks files in one process of the job (a DDP supervisor did it
        # already; rank 0 checks again). The pretraining cache below is filled once under its own file lock.
        ranks.prepare_once(cfg, run_dir, dm.prepare_data)
        # Lightning's fit and test call prepare_data again on each node's first rank, and RealImageSets.setup on
        # every rank: the job's data are prepared, so those calls have nothing left to do
        dm.prepare_data = _prepared
        pretrained = cfg.backbone.pretrained
        if pretrained == "source":
            pretrained = str(source_weights(cfg))
        net, dm.preprocess = build_net(cfg, dm.num_classes, pretrained, classnames=classnames_of(cfg, dm))
        module = build_module(cfg, net, dm)
        check_ood_validation(_rules(cfg), module.eval_sets["val"], _data_name(cfg))
        # theta_0 of the drift diagnostics: copied before prepare_for_device compiles the network in place
        monitor = build_monitor(cfg, net, dm)
        prepare_for_device(cfg, net)
        say(f"preprocessing (timm config of {cfg.backbone.name}): {dm.preprocess}")
        if ranks.world_size(cfg) > 1:  # now that the network is built alike on every rank: their own streams
            L.seed_everything(ranks.rank_seed(cfg.seed, rank), workers=True, verbose=False)
        module.identity = identity(record.payload["config"], job)  # checkpoints carry it (thawlab.resume)
        if rank == 0:
            print_partition(net, module.phases)
        zeroshot = evaluate_zeroshot(cfg, net, dm) if rank == 0 else {}
        probe = solve_probe(cfg, net, dm, module, say) if module.phases[0].solver == "lbfgs" else None
        make_logger = instantiate(cfg.logger, _partial_=True)  # run-time arguments stay plain Python
        logger = make_logger(save_dir=str(run_dir), name=job["name"], group=job["group"],
                             run_config=record.payload["config"], resume=ckpt_path is not None)
        # the epochs the phases run: trainer.max_epochs, less a solved probe's (it runs one)
        trainer = build_trainer(cfg.trainer, run_dir, logger, ddp=cfg.ddp, early_stopping=cfg.early_stopping,
                                select=cfg.schedule.get("select", "best"), rules=_rules(cfg),
                                callbacks=[monitor] if monitor else [],
                                max_epochs=sum(p.epochs for p in module.phases))
        io = trainer.strategy.checkpoint_io  # a signal never cuts a checkpoint short (thawlab.resume)
        io.save_checkpoint = signals_deferred(io.save_checkpoint)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        trace = module.trace  # before test: loading the selected checkpoint restores its (shorter) trace
        if rank == 0:
            print_auto_lr(trace)
        stopping = early_stopping_report(cfg, module)
        if trainer.world_size > 1:
            say(f"DDP: {trainer.world_size} processes ({trainer.strategy.root_device.type}); weights identical "
                f"across ranks at the end of fit: {module.ranks_in_sync}")
        metrics, selection, wise, drift, selections = evaluate_selected(cfg, trainer, module, dm, pretrained,
                                                                        run_dir)
        metrics.update(zeroshot)
        if rank != 0:
            failed = False
            return metrics
        record.finish(metrics=metrics, counts=module.counts, selection=selection, selections=selections,
                      trace=trace, wise=wise, distributed=module.rank_report, **stopping, **drift,
                      **({"probe": probe} if probe else {}))
        log_final_metrics(logger, metrics)
        others = tuple(f"test/{name}/" for name, s in selections.items() if not s["primary"])
        print_metrics({k: v for k, v in metrics.items() if not k.startswith(others)},
                      selected=f"by {selection['rule']} over {', '.join(selection['phases'])}: epoch "
                               f"{selection['epoch']} ({selection['phase']})")
        for name, s in selections.items():
            if not s["primary"]:
                print_metrics(metrics, stage=f"test/{name}", selected=f"by selection rule {name} ({s['rule']}) "
                              f"over {', '.join(s['phases'])}: epoch {s['epoch']} ({s['phase']})")
        if zeroshot:
            print_metrics(zeroshot, stage="test/zeroshot", selected="before training: the zero-shot model")
        if wise:
            print_wise(wise)
        say(f"results: {run_dir / 'results.json'}")
        failed = False
        return metrics
    except BaseException as e:
        _interrupted(e, cfg, run_dir)
        record.fail(error_line(e), trace=module.trace if module else [])
        raise
    finally:
        finish_wandb(failed)


def solve_probe(cfg: DictConfig, net, dm, module, say) -> dict:
    """schedule.solver=lbfgs: the probe phase's head fit by L-BFGS before fit (thawlab/probe.py), on features from
    the shared store; every rank solves alike (the store computes them once). results.json `probe`."""
    import torch

    from thawlab.build import cache_options, on_gpu
    from thawlab.probe import solve_probe as solve

    gpu = on_gpu(cfg.trainer) and torch.cuda.is_available()
    # a DDP rank on its own GPU (LOCAL_RANK, set for every rank), as Lightning will place it
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    return solve(cfg, net, dm, module.cache, device, cache_options(cfg)["shared_gb"], note=say)


def evaluate_zeroshot(cfg: DictConfig, net, dm) -> dict:
    """head=zeroshot: the zero-shot model (the network as built, before any training) on every test set,
    `test/zeroshot/<set>/<metric>` (results.json, W&B). One process: under DDP the other ranks wait for it at
    the start of fit (within ddp.timeout_s). A resumed run builds the same network, so it reports the same."""
    if not getattr(net.head, "needs_text", False):
        return {}
    import torch

    from thawlab.build import on_gpu
    from thawlab.metrics import evaluate

    device = torch.device("cuda" if on_gpu(cfg.trainer) and torch.cuda.is_available() else "cpu")
    net.to(device)
    try:
        return evaluate(net, dm.eval_dataloaders("test", distributed=False), dm.num_classes, "test/zeroshot",
                        dm.class_subsets, cfg.trainer.limit_test_batches)
    finally:
        net.to("cpu")


def _prepared() -> None:
    """A data module's prepare_data once thawlab.ranks.prepare_once has run it for the job."""


def early_stopping_report(cfg: DictConfig, module) -> dict:
    """results.json `early_stopping` (when it is on): its settings and each phase it cut short."""
    es = cfg.get("early_stopping")
    if es is None or es.patience is None:
        return {}
    return {"early_stopping": {"monitor": es.monitor, "patience": es.patience, "min_delta": es.min_delta,
                               "stopped": list(module.stopped), "epochs_run": len(module.trace),
                               "epochs_planned": cfg.trainer.max_epochs}}


def _rules(cfg: DictConfig) -> list:
    """selection.rules (configs composed before the key existed have none)."""
    return list((cfg.get("selection") or {}).get("rules") or [])


def _data_name(cfg: DictConfig) -> str:
    """The data option as typed (data=digits), else the data module's class."""
    try:
        return HydraConfig.get().runtime.choices["data"]
    except (ValueError, KeyError, AttributeError):  # a DDP rank process: no Hydra here
        return str(cfg.data.get("_target_", "?")).rsplit(".", 1)[-1]


def _selected(selector, module) -> tuple[str, dict]:
    """(the checkpoint a selection callback holds, what it selected), read before any test: loading a checkpoint
    restores the callbacks' state as that file has it, and a file is written before its own epoch is recorded."""
    path = selector.best_model_path
    if not path:  # e.g. no validation ran in a considered phase: nothing to select from
        what = (f"schedule.select={selector.rule}" if selector.primary else f"selection rule {selector.name}")
        raise ThawlabError(f"no checkpoint was selected ({what}, schedule.select_phases="
                           f"{[p.name for p in module.phases if p.select]}): did validation run in those phases?")
    return path, dict(selector.selected or {})


def _selection_entry(selector, module, path: str, chosen: dict, run_dir: Path) -> dict:
    """results.json's record of one rule's checkpoint: rule, phases, phase, checkpoint, value, epoch (and `val`,
    both validation scores of that epoch, where recorded)."""
    import torch

    from thawlab.schedules import phase_at

    epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    if chosen.get("epoch") != epoch:  # resumed from a checkpoint written before selections were recorded
        chosen = {"epoch": epoch, "phase": phase_at(module.phases, epoch)[1].name,
                  "value": _float(selector.best_model_score)}
    entry = {"rule": selector.description, "phases": [p.name for p in module.phases if p.select],
             "phase": chosen["phase"], "checkpoint": os.path.relpath(path, run_dir), "value": chosen["value"],
             "epoch": epoch}
    return {**entry, "val": chosen["val"]} if chosen.get("val") else entry


def evaluate_selected(cfg: DictConfig, trainer, module, dm, pretrained, run_dir: Path
                      ) -> tuple[dict, dict, list | None, dict, dict]:
    """The selected checkpoint (thawlab/selection.py: schedule.select over schedule.select_phases) on every test
    set, and each other rule's of selection.rules (metrics test/<rule>/...); then what the run asks for on top of
    the primary one: its drift from the pretrained network, forgetting on the source task, the exported model,
    the WiSE-FT curve. (metrics, selection, wise curve, {"diagnostics": ...} or {}, selections)"""
    from thawlab.build import console, export_model
    from thawlab.pretrain import source_retention
    from thawlab.selection import SelectCheckpoint
    from thawlab.wise import wise_curve

    selector = trainer.checkpoint_callback
    others = [c for c in trainer.callbacks if isinstance(c, SelectCheckpoint) and not c.primary]
    best, chosen = _selected(selector, module)
    picked = {c.name: _selected(c, module) for c in others}
    # the other rules' checkpoints first, every rank taking part, so that the primary one is loaded last: drift,
    # forgetting, export and WiSE-FT below work on the module as its test leaves it
    tested = {}
    for c in others:
        module.metric_prefix["test"] = f"test/{c.name}"
        try:
            trainer.test(module, datamodule=dm, ckpt_path=picked[c.name][0], verbose=False)
        finally:
            module.metric_prefix.pop("test", None)
        tested[c.name] = dict(module.computed["test"])
    monitor = drift_monitor(trainer)
    if monitor is not None:  # the drift of the selected checkpoint reads its features off this test pass
        monitor.capture_next_test(module.net, module.eval_sets["test"], trainer.precision)
    trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    metrics, extra, wise = dict(module.computed["test"]), {}, None  # the selected checkpoint is loaded
    drift = drift_report(trainer, module, chosen)  # every rank takes part (gathered samples)
    if trainer.global_rank != 0:  # what follows runs in one process: evaluations on top, files
        return metrics, {}, None, {}, {}
    selection = _selection_entry(selector, module, best, chosen, run_dir)
    selections = {selector.name: {**selection, "primary": True, "metrics": dict(metrics)}}
    for c in others:
        prefix = f"test/{c.name}/"
        selections[c.name] = {**_selection_entry(c, module, *picked[c.name], run_dir), "primary": False,
                              "metrics": {"test/" + k.removeprefix(prefix): v for k, v in tested[c.name].items()}}
        metrics.update(tested[c.name])
    epoch = selection["epoch"]
    net = module.net
    if cfg.backbone.pretrained == "source":
        extra.update(source_retention(cfg, net, dm.preprocess, Path(pretrained)))
    if cfg.export or cfg.schedule.get("adapter"):
        export_model(net, cfg.schedule.get("adapter"), run_dir / "model.safetensors")
    head_only = {p.name for p in module.phases if p.trainable == ("head",)}
    if cfg.schedule.get("alphas") and selection["phase"] in head_only:
        console.print(f"[yellow]warning: WiSE-FT's theta_ft is epoch {epoch} of phase {selection['phase']}, which "
                      f"trains the head only: the curve interpolates between two linear probes "
                      f"(schedule.select_phases)[/yellow]")
    if cfg.schedule.get("alphas"):
        wise = wise_curve(net, module.theta0, dm.eval_dataloaders("test", distributed=False), dm.num_classes,
                          list(cfg.schedule.alphas), dm.class_subsets, cfg.trainer.limit_test_batches)
        extra.update({k: v for point in wise for k, v in point["metrics"].items()})
    if trainer.logger and extra:
        trainer.logger.log_metrics(extra, step=trainer.global_step)
    selection.pop("val", None)  # results.json `selection` as it always was; `selections` has the scores
    return {**metrics, **extra}, selection, wise, drift, selections


def drift_monitor(trainer):
    """The run's DriftMonitor callback (None with diagnostics=none)."""
    from thawlab.diagnostics import DriftMonitor

    return next((c for c in trainer.callbacks if isinstance(c, DriftMonitor)), None)


def drift_report(trainer, module, chosen: dict) -> dict:
    """results.json `diagnostics` (thawlab/diagnostics.py): settings, the drift of the selected checkpoint
    (`final`, also logged to W&B as diag/final/...) and of the epochs measured during fit (`history`); {} when
    diagnostics=none."""
    from thawlab.diagnostics import flatten

    monitor = drift_monitor(trainer)
    if monitor is None:
        return {}
    final = monitor.measure(module.net, trainer.global_rank, trainer.world_size, epoch=chosen.get("epoch"),
                            from_test=True)
    if trainer.global_rank != 0:
        return {}
    if trainer.logger:
        trainer.logger.log_metrics(flatten(final, "diag/final"), step=trainer.global_step)
    from thawlab.build import print_drift

    print_drift(final)
    return {"diagnostics": {**monitor.settings(), "final": final, "history": list(monitor.history)}}


def resume_path(ckpt_path: str | None, run_dir: Path, multirun: bool = False) -> str | None:
    """ckpt_path=last: this run directory's checkpoints/last.ckpt (the end of its latest epoch). In a sweep
    (`-m ... ckpt_path=last`, or a SLURM job requeued after preemption) a job with no last.ckpt yet starts
    fresh: one command resumes the interrupted jobs and runs the ones that never started."""
    if ckpt_path != "last":
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise ThawlabError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        return ckpt_path
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file() and multirun:
        return None
    if not path.is_file():
        raise ThawlabError(f"ckpt_path=last: {path} does not exist; resume a run by its directory "
                           f"(thawlab-train --resume <run dir>) or pass a checkpoint file")
    return str(path)


def pretrain(cfg: DictConfig) -> None:
    """experiment=pretrain_source: (re)run the source pretraining of this backbone and data, refresh the cache."""
    from thawlab.build import check_config
    from thawlab.pretrain import source_weights

    check_config(cfg)
    source_weights(cfg, force=True)


def _float(x):
    return None if x is None else float(x)


def _multirun() -> bool:
    return HydraConfig.get().mode.name == "MULTIRUN"


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig):
    try:
        config.check_values(cfg)  # ranges first: a bad value answers before torch is even imported
        if cfg.task == "pretrain":
            return pretrain(cfg)
        if cfg.task != "finetune":
            raise ThawlabError(f"task={cfg.task!r} is not one of finetune, pretrain")
        return train(cfg)
    except Exception as e:  # noqa: BLE001
        if _multirun():  # train() has marked the job failed; the others go on, SweepSummary lists it at the end
            print(f"thawlab-train: job {Path(HydraConfig.get().runtime.output_dir).name} failed: "
                  f"{user_error(e) or f'{type(e).__name__}: {e}'}", file=sys.stderr)
            return None
        if isinstance(e, ThawlabError):
            _exit_with(str(e), getattr(e, "exit_code", 2))  # here, not after Hydra has printed its own "Error executing job" line
        raise


def _exit_with(message: str, code: int = 2) -> None:
    print(f"thawlab-train: error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point: bad input is one line on stderr and exit status 2, never a traceback."""
    config.register()
    threads.record_launch_setting()  # before a launcher's workers export their own OMP_NUM_THREADS
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, rather than Hydra's multi-line report
    try:
        if not _take_resume_flag():
            return  # --resume of a finished run: nothing to do
        _hydra_main()
    except Interrupted as e:  # results.json says the same; 128 + the signal number, as a shell reports it
        print(f"thawlab-train: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        message = user_error(e)
        if message is None:
            raise
        _exit_with(message, getattr(e, "exit_code", 2))
    if sweep.failed_jobs:
        sys.exit(1)


def _take_resume_flag() -> bool:
    """`--resume <run dir> [overrides]` (or `--resume=<dir>`): replace argv by the run's own overrides and
    directory before Hydra parses it. False: the run is finished and nothing is left to do."""
    args = sys.argv[1:]
    if not args or not args[0].startswith("--resume"):
        if any(a == "--resume" or a.startswith("--resume=") for a in args):
            raise ThawlabError("--resume <run dir> comes first: thawlab-train --resume <run dir> [key=value ...]")
        if (any(is_resume_key(a) for a in args) and not {"-m", "--multirun"} & set(args)
                and not any(a.startswith("hydra.output_subdir") for a in args)):
            # a single run resumed with ckpt_path: Hydra would rewrite <run>/.hydra with this command's config
            # before thawlab can compare it with the checkpoint's; the run's .hydra keeps its first launch
            sys.argv.append("hydra.output_subdir=null")
        return True
    if args[0].startswith("--resume="):
        path, rest = args[0][len("--resume="):], args[1:]
    elif len(args) > 1:
        path, rest = args[1], args[2:]
    else:
        raise ThawlabError("--resume needs a run directory: thawlab-train --resume <run dir>")
    if any(a in ("-m", "--multirun") or is_resume_key(a) or a.startswith("hydra.run.dir") for a in rest):
        raise ThawlabError("--resume resumes one run in its own directory: no -m, ckpt_path or hydra.run.dir")
    argv = resume_argv(path, rest)
    if argv is None:
        return False
    sys.argv[1:] = argv
    return True


def user_error(e: BaseException) -> str | None:
    """One line for an error in the user's input; None for a bug (which keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from thawlab.errors import did_you_mean

    if isinstance(e, ThawlabError):
        return str(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        options = list(e.options or [])
        if group:
            hint = "; the joblib and submitit launchers: pip install 'thawlab[sweep]'" if "launcher" in group else ""
            return (f"unknown {group} {option!r} (choose from {', '.join(options)})"
                    f"{did_you_mean(option, options)}{hint}")
        return str(e).splitlines()[0]
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) and e.__cause__ else e
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = (getattr(cause, "msg", None) or str(cause)).splitlines()[0]
        if "not in struct" in msg and key:  # e.g. backbone.kwargs, which holds no keys until given some
            msg += f" (to add a key: +{key}=...)"
        elif key and (swept := _swept_group(key)):
            # Hydra composes a multirun's config once with the group's default option, before the sweep picks
            # each option: a key that only the swept options have is not there yet
            msg += (f" (a sweep over {swept}: a key of those options alone cannot be set for the whole sweep; "
                    f"run one sweep per option, e.g. {swept.split(',')[0]} {key}=...)")
        return f"{key}: {msg}" if key else msg
    if isinstance(e, (ConfigCompositionException, OverrideParseException)):
        return " ".join(str(e).split())
    return None


def _swept_group(key: str) -> str | None:
    """`group=a,b` from this multirun's command line when `key` lies in that config group, else None."""
    args = sys.argv[1:]
    if not {"-m", "--multirun"} & set(args):
        return None
    group = key.split(".")[0]
    return next((a for a in args if a.startswith(f"{group}=") and "," in a), None)


if __name__ == "__main__":
    main()
