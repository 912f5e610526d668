"""Training of one stage: epochs of reproducible batches, validation Dice, exact checkpoints.

One :class:`StageTrainer` trains one network of a recipe through its phases. Per epoch:
``iterations`` batches from :class:`~Training.sampling.PatchSampler` (loaded in worker processes
when ``workers > 0``), augmented on the device, forward (in the precision of ``training.precision``:
:func:`mixed_precision`), loss (always in float32), step;
the schedule sees the epoch's mean loss; validation (every ``validation.every_epochs``) predicts each
validation volume of the cache with the library's :func:`KidneyTumorSegLib.stages.predict_stage` (the
function the Segmenter predicts every region with, so window blending, margins and padding are the
deployed package's) and reports KiTS19 kidney / tumor Dice; then the checkpoint and the metrics log are written.

Files in the stage folder:

* ``checkpoint_last.pt`` - model, optimizer, schedule, AMP scaler, epoch, phase, RNG states (torch,
  CUDA, numpy, python), history, top-k list; written atomically after every epoch. Resuming from
  it continues exactly as an uninterrupted run: batches and augmentations are functions of
  (seed, phase, epoch, iteration, rank), so nothing else needs saving. (Bit for bit in float32; not with
  ``training.precision: bf16`` on a CPU, whose conv3d weight gradients are not reproducible: see
  :func:`mixed_precision`.)
* ``metrics.jsonl`` - one JSON line per epoch: stage, phase, epoch (completed count), train_loss,
  lr, val (kidney / tumor Dice), val_score (their mean), seconds.
* ``top/epoch_XXXX.pt`` - weights of the best ``keep_top_k`` epochs of the final phase by
  val_score (an ensemble at export); ``final.pt`` - weights when the stage has finished.

Hooks (objects with ``on_iteration_end(trainer, epoch, iteration, loss)`` and/or
``on_epoch_end(trainer, record)``) observe training; an exception from a hook stops it (the last
checkpoint stays valid).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from KidneyTumorSegLib.errors import OutputError
from KidneyTumorSegLib.manifest import StageSpec, network_in_channels, unweighted_stage
from KidneyTumorSegLib.networks import build_network
from KidneyTumorSegLib.stages import class_values, pad_value, predict_stage, stage_labels, stage_predictor

from .augmentation import Augmenter
from .distributed import DistInfo, barrier, mean_across
from .losses import CompositeLoss
from .metrics import structure_masks
from .preprocess import load_volume
from .sampling import BatchDataset, PatchSampler
from .schedules import EpochSchedule

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_last.pt"
METRICS = "metrics.jsonl"
FINAL = "final.pt"
TOP_DIR = "top"
CHECKPOINT_FORMAT = 1
#: ``training.precision`` values: the forward pass's arithmetic (see :func:`mixed_precision`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def mixed_precision(precision: str, device: torch.device) -> tuple:
    """``(autocast dtype or None, whether a gradient scaler is needed)`` of ``training.precision`` on ``device``.

    ``"auto"`` (the default): float16 autocast with a gradient scaler on CUDA, float32 elsewhere (what every run
    before this setting did); ``"fp32"``: float32 everywhere; ``"bf16"``: bfloat16 autocast on CPU or CUDA, no
    scaler (bfloat16 has float32's exponent range) - on a CPU with AVX512-BF16 a VB-Net training step runs 1.6-2x faster
    (benchmarks/README); ``"fp16"``: float16 autocast with a scaler, CUDA only. Weights, optimizer state and the loss
    stay float32 in every mode. Anything else, or a mode the device cannot run, is a ValueError naming the choices.

    bf16 on a CPU is experimental: with torch 2.13 the bfloat16 conv3d weight gradient is not reproducible and, on
    small feature maps, now and then garbage (seen: 14 of 40 backward passes of the smoke VB-Net on a 32³ patch off
    by up to 1e37; none of 15 passes of the bundled fine network on 64³ patches off by more than 1 %). Check a bf16
    run against a float32 one before trusting it (Training/README, round 12).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"training.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    kind = device.type
    if precision == "auto":
        return (torch.float16, True) if kind == "cuda" else (None, False)
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"training.precision 'bf16' runs on cpu or cuda, not on {kind!r}; use 'fp32' there")
        return torch.bfloat16, False
    if kind != "cuda":
        raise ValueError(f"training.precision 'fp16' needs a CUDA device (a gradient scaler); this run is on {kind!r}: "
                         "use 'bf16' or 'fp32'")
    return torch.float16, True


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD from a recipe's optimizer spec."""
    name = spec.get("name", "adam")
    lr = float(spec["lr"])
    wd = float(spec.get("weight_decay", 0.0))
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=wd, betas=tuple(spec.get("betas", (0.9, 0.999))), eps=float(spec.get("eps", 1e-8)))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.99)),
                               nesterov=bool(spec.get("nesterov", True)))
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, adamw, sgd")


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(state: list) -> None:
    np.random.set_state((state[0], np.asarray(state[1], dtype=np.uint32), state[2], state[3], state[4]))


class Hook:
    """Base class of training hooks; override what you need."""

    def on_iteration_end(self, trainer: "StageTrainer", epoch: int, iteration: int, loss: float) -> None:
        return None

    def on_epoch_end(self, trainer: "StageTrainer", record: dict) -> None:
        return None


class StageTrainer:
    """Trains one resolved recipe stage.

    ``stage``: ``{"name", "phases": [{"epochs", "manifest", "training"}]}`` from
    :func:`Training.recipes.resolve`; ``folders[p]``: the cache folder of phase p;
    ``train_records[p]`` / ``val_records[p]``: that folder's volume records for the training and
    validation cases; ``device``: a torch device; ``seed``: everything random derives from it.
    ``mix_sources[p]``: ``(folder, records)`` of a second cache (CT images) that phase p mixes in by batch when its
    training settings have ``mix`` {``fraction``, ``augmentation``} (e.g. rendered phantoms beside a synthesis cache).
    ``earlier_stages``: the resolved stages before this one; only a cascade (``prior_from``) needs them, for the
    prior stage's classes (input channels).

    Each phase's manifest entry is read as the library reads a package's stage (:attr:`specs`, typed and
    validated by :func:`~KidneyTumorSegLib.manifest.unweighted_stage`): classes, network, input channels,
    normalisation, spacing and everything validation's sliding window uses come from there, never from the raw dict.
    """

    def __init__(self, out_dir: Path, stage: dict, folders: Sequence[Path], train_records: Sequence[list],
                 val_records: Sequence[list], device: torch.device, seed: int = 0, workers: int = 0,
                 hooks: Sequence[Hook] = (), progress: Optional[Callable[[int, int, str], None]] = None,
                 dist: Optional[DistInfo] = None, init_weights: Optional[Path] = None,
                 mix_sources: Optional[Sequence[Optional[tuple]]] = None, earlier_stages: Sequence[dict] = ()):
        self.out = Path(out_dir)
        self.mix_sources = list(mix_sources) if mix_sources else [None] * len(stage["phases"])
        self.init_weights = Path(init_weights) if init_weights else None
        self.stage = stage
        self.name = stage["name"]
        self.phases = stage["phases"]
        self.specs: list[StageSpec] = [unweighted_stage(ph["manifest"], f"stage {self.name!r} phase {p}")
                                       for p, ph in enumerate(self.phases)]
        self.folders = [Path(f) for f in folders]
        self.train_records, self.val_records = list(train_records), list(val_records)
        self.device = device
        self.seed = int(seed)
        self.workers = int(workers)
        self.hooks = list(hooks)
        self.progress = progress
        self.dist = dist
        self.rank = dist.rank if dist else 0
        self.is_main = dist is None or dist.is_main
        starts = np.cumsum([0] + [int(p["epochs"]) for p in self.phases])
        self.phase_starts = [int(s) for s in starts]
        self.total_epochs = self.phase_starts[-1]
        final = self.specs[-1]  # the network the stage exports
        self.keep_top_k = int(self.phases[-1]["training"].get("keep_top_k", 1))
        torch.manual_seed(_seed_int(self.seed, 1))
        earlier = [unweighted_stage(s["phases"][-1]["manifest"], f"stage {s['name']!r}") for s in earlier_stages]
        self.in_channels = network_in_channels(final, earlier)
        self.net = build_network(final.network.name, in_channels=self.in_channels, num_classes=final.num_outputs,
                                 **final.network.kwargs).to(device)
        self.spatial_dims = int(getattr(self.net, "spatial_dims", 3))
        self.model = self.net
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        # every phase's precision is checked now, so a wrong value fails before the first epoch, not at phase 2
        self.precisions = [mixed_precision(str(ph["training"].get("precision", "auto")), device) for ph in self.phases]
        self.scaler = torch.amp.GradScaler("cuda", enabled=any(scaled for _, scaled in self.precisions))
        self.epoch = 0
        self.phase = -1
        self.history: list = []
        self.top: list = []

    # -- phases ---------------------------------------------------------------------------------
    def phase_of(self, epoch: int) -> int:
        for p in range(len(self.phases)):
            if epoch < self.phase_starts[p + 1]:
                return p
        return len(self.phases) - 1

    def _start_phase(self, p: int) -> None:
        self.phase = p
        phase = self.phases[p]
        spec, t = self.specs[p], phase["training"]
        classes = list(spec.classes)
        self.optimizer = build_optimizer(t["optimizer"], self.net.parameters())
        self.schedule = EpochSchedule(t.get("scheduler"), float(t["optimizer"]["lr"]), int(phase["epochs"]))
        # the loss sees the context classes too (the sampler and validation only the labels)
        self.loss_fn = CompositeLoss(t["loss"]["terms"], classes + list(spec.context_classes), t["loss"].get("outputs"))
        norm = spec.normalization
        self.pad_value = pad_value(spec)
        patch_xyz = list(t["patch_size"])
        patch = tuple(reversed(patch_xyz))[-self.spatial_dims:] if self.spatial_dims == 2 else tuple(reversed(patch_xyz))
        self.sampler = PatchSampler(self.folders[p], self.train_records[p], patch, t, self.pad_value, len(classes),
                                    self.seed, p)
        spacing = [1.0 if s is None else float(s) for s in spec.spacing_mm]
        # intensity augmentation is for the CT channels only: a cascade's prior channels are probabilities
        image_channels = spec.inputs.slices_as_channels or 1
        self.augmenter = Augmenter(t.get("augmentation") or {}, spacing, self.spatial_dims, self.pad_value,
                                   image_channels, norm.scale, norm,
                                   context=context_targets(spec.context_classes, len(classes)))
        self.mix = None
        mix_spec = t.get("mix")
        if mix_spec and spec.context_classes:
            raise ValueError(f"stage {self.name!r} names context classes {list(spec.context_classes)}, which only a "
                             "synthesis tissue map can label: it cannot mix in a source of CT images (training.mix)")
        if mix_spec:
            if self.mix_sources[p] is None:
                raise ValueError(f"stage {self.name!r} mixes in a second training source (training.mix): give its cache "
                                 "with train --mix-data")
            folder, records = self.mix_sources[p]
            mix_training = dict(t, augmentation=mix_spec.get("augmentation") or {})
            # its own sampler seed: the two sources must not draw the same patch positions
            sampler = PatchSampler(folder, records, patch, mix_training, self.pad_value, len(classes),
                                   _seed_int(self.seed, 3), p)
            augmenter = Augmenter(mix_spec.get("augmentation") or {}, spacing, self.spatial_dims, self.pad_value,
                                  image_channels, norm.scale, norm)
            if augmenter.synthesizer is not None:
                raise ValueError("training.mix.augmentation must not synthesize: the mixed-in source holds CT images")
            self.mix = (float(mix_spec["fraction"]), sampler, augmenter)

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def state(self) -> dict:
        """Everything an exact resume needs."""
        return {
            "format": CHECKPOINT_FORMAT, "stage": self.name, "epoch": self.epoch, "phase": self.phase,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "history": self.history, "top": self.top,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": list(random.getstate()),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def _save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != self.name:
            raise ValueError(f"{self.checkpoint_path} is not a checkpoint of stage {self.name!r}")
        self.net.load_state_dict(state["model"])
        self._start_phase(int(state["phase"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.top = list(state["top"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        _set_numpy_state(rng["numpy"])
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def load_initial_weights(self, path: Path) -> None:
        """Start from another run's weights (fine-tuning): ``path`` is a state dict (``final.pt``, a ``top``
        file) or a training checkpoint of a network with this stage's architecture. A network without this stage's
        context classes fits too: its output layers grow by copies of their background row
        (:func:`with_context_outputs`), so the new network starts out predicting exactly what the old one did. A
        batch-norm network fits an instance-norm one of the same shape: its running statistics are dropped
        (:func:`without_batch_statistics`)."""
        from KidneyTumorSegLib.errors import InputError

        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and "format" in state:
            state = state["model"]
        spec = self.specs[-1]
        target = self.net.state_dict()
        if spec.context_classes:
            state = with_context_outputs(state, target, len(spec.classes))
        state = without_batch_statistics(state, target)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(f"stage {self.name!r}: the weights in {path} do not fit this stage's network "
                             f"({str(exc).splitlines()[0]})") from None
        logger.info("stage %s: initialised from %s", self.name, path)

    def _write_metrics(self) -> None:
        tmp = self.out / f".{METRICS}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.out / METRICS)

    # -- training ------------------------------------------------------------------------------------
    def fit(self, max_epochs: Optional[int] = None, resume: bool = False, max_minutes: Optional[float] = None) -> dict:
        """Train until the last phase ends (or ``max_epochs`` epochs are done, or the epoch during which
        ``max_minutes`` of this call's time ran out has ended, or the schedule stops the last phase).
        ``resume`` continues from ``checkpoint_last.pt`` when it exists. Returns a summary."""
        started = time.perf_counter()
        if resume and self.checkpoint_path.is_file():
            self._load_checkpoint()
            logger.info("stage %s: resumed after epoch %d", self.name, self.epoch)
        elif self.checkpoint_path.is_file() and self.is_main:
            raise OutputError(f"{self.checkpoint_path} exists; resume it (--resume) instead of starting over")
        elif self.init_weights is not None:
            self.load_initial_weights(self.init_weights)
        limit = self.total_epochs if max_epochs is None else min(self.total_epochs, int(max_epochs))
        while self.epoch < limit:
            p = self.phase_of(self.epoch)
            if p != self.phase:
                self._start_phase(p)
            self._run_epoch(p)
            # every DDP rank must stop after the same epoch: stop when any rank's clock says so
            over = max_minutes is not None and time.perf_counter() - started >= 60.0 * float(max_minutes)
            if max_minutes is not None and mean_across(float(over), self.dist, self.device) > 0:
                logger.info("stage %s: time budget of %s min used after epoch %d", self.name, max_minutes, self.epoch)
                break
        finished = self.epoch >= self.total_epochs
        if finished and self.is_main:
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, self.out / FINAL)
        barrier(self.dist)
        return {"stage": self.name, "epochs_done": self.epoch, "total_epochs": self.total_epochs, "finished": finished,
                "best": self.top[0] if self.top else None, "last": self.history[-1] if self.history else None}

    def _run_epoch(self, p: int) -> None:
        t0 = time.perf_counter()
        epoch_in_phase = self.epoch - self.phase_starts[p]
        lr = self.schedule.lr_for_epoch(epoch_in_phase)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = mean_across(self._train_epoch(epoch_in_phase), self.dist, self.device)
        stop = self.schedule.end_epoch(epoch_in_phase, loss)
        val = None
        validation = self.phases[p]["training"].get("validation") or {}
        every = max(1, int(validation.get("every_epochs", 1)))
        is_phase_end = self.epoch + 1 == self.phase_starts[p + 1] or stop
        # a synthesis cache holds tissue ids, not images: nothing to validate a network on
        synthetic = self.augmenter.synthesizer is not None
        if self.is_main and self.val_records[p] and not synthetic and ((epoch_in_phase + 1) % every == 0 or is_phase_end):
            val = self.validate(p, validation.get("max_cases"))
        self.epoch = self.phase_starts[p + 1] if stop else self.epoch + 1
        record = {"stage": self.name, "phase": p, "epoch": self.epoch, "train_loss": loss, "lr": lr,
                  "val": val, "val_score": None if not val else float(np.mean(list(val.values()))),
                  "stopped_by_schedule": bool(stop), "seconds": round(time.perf_counter() - t0, 3)}
        self.history.append(record)
        if self.is_main:
            if p == len(self.phases) - 1 and record["val_score"] is not None:
                self._keep_top(record)
            self._save_checkpoint()
            self._write_metrics()
        barrier(self.dist)
        logger.info("stage %s epoch %d/%d: loss %.4f lr %.2e%s", self.name, self.epoch, self.total_epochs, loss, lr,
                    "" if not val else " val " + " ".join(f"{k} {v:.3f}" for k, v in val.items()))
        for hook in self.hooks:
            hook.on_epoch_end(self, record)

    def _train_epoch(self, epoch_in_phase: int) -> float:
        iterations = self.sampler.iterations_per_epoch()
        keys = [(self.epoch, it) for it in range(iterations)]
        fraction, mix_sampler, mix_augmenter = self.mix or (0.0, None, None)
        dataset = BatchDataset(self.sampler, keys, self.rank, mix_sampler, fraction, _seed_int(self.seed, self.phase, 4))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda")
        self.model.train()
        losses = []
        for x, y, it, source in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            gen = torch.Generator().manual_seed(_seed_int(self.seed, self.phase, self.epoch, it, self.rank, 2))
            x, y = (mix_augmenter if int(source) else self.augmenter)(x, y, gen)
            dtype, scaled = self.precisions[self.phase]
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.model(x)
            loss = self.loss_fn(out, y.long(), self.epoch)
            self.optimizer.zero_grad(set_to_none=True)
            if scaled:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            value = float(loss.detach().item())
            losses.append(value)
            for hook in self.hooks:
                hook.on_iteration_end(self, self.epoch, int(it), value)
            if self.progress is not None and self.is_main:
                self.progress(int(it) + 1, iterations, f"{self.name} epoch {self.epoch + 1}/{self.total_epochs} loss {value:.4f}")
        return float(np.mean(losses))

    @torch.no_grad()
    def predict(self, p: int, image: np.ndarray) -> np.ndarray:
        """Class probabilities float32 ``[K, z, y, x]`` of the network (as it is now) on a cached volume
        ``image`` float32 ``[C, z, y, x]`` of phase ``p``: the library's :func:`~KidneyTumorSegLib.stages.predict_stage`
        with phase ``p``'s stage entry, exactly as inference runs it on that region, without test-time augmentation
        (it triples validation time and is chosen at deployment)."""
        spec = self.specs[p]
        was_training = self.net.training
        self.net.eval()
        try:
            return predict_stage(spec, stage_predictor(spec, [self.net], self.device, tta=False), image, self.device)
        finally:
            self.net.train(was_training)

    def validate(self, p: Optional[int] = None, max_cases: Optional[int] = None) -> dict:
        """KiTS19 kidney / tumor Dice of the network on phase ``p``'s validation volumes (:meth:`predict`: the
        sliding window exactly as in inference, no test-time augmentation): per case over all its regions, then the
        mean over cases (a case with the structure in neither truth nor prediction scores 1)."""
        p = self.phase if p is None else p
        spec = self.specs[p]
        values = class_values(spec)
        records = self.val_records[p]
        if max_cases:
            keep = sorted({r["case"] for r in records})[: int(max_cases)]
            records = [r for r in records if r["case"] in keep]
        counts: dict = {}  # case -> structure -> [intersection, predicted + true voxels]
        for r in records:
            image, target = load_volume(self.folders[p], r["stem"])
            pred = stage_labels(spec, self.predict(p, image))
            truth = values[np.asarray(target)]
            for name, (a, b) in structure_masks(pred, truth, values).items():
                c = counts.setdefault(r["case"], {}).setdefault(name, [0, 0])
                c[0] += int(np.logical_and(a, b).sum())
                c[1] += int(a.sum()) + int(b.sum())
        scores: dict = {}
        for per_case in counts.values():
            for name, (inter, total) in per_case.items():
                scores.setdefault(name, []).append(1.0 if total == 0 else 2.0 * inter / total)
        return {k: float(np.mean(v)) for k, v in scores.items()}

    def _keep_top(self, record: dict) -> None:
        top_dir = self.out / TOP_DIR
        top_dir.mkdir(parents=True, exist_ok=True)
        entry = {"epoch": record["epoch"], "val_score": record["val_score"], "file": f"{TOP_DIR}/epoch_{record['epoch']:04d}.pt"}
        candidates = sorted(self.top + [entry], key=lambda e: (-e["val_score"], e["epoch"]))[: self.keep_top_k]
        if entry in candidates:
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, self.out / entry["file"])
        for old in self.top:
            if old not in candidates:
                (self.out / old["file"]).unlink(missing_ok=True)
        self.top = candidates


def context_targets(context_classes, num_classes: int) -> Optional[list]:
    """``[(target class index, tissue ids)]`` of a stage's context classes (after its ``num_classes`` label
    classes), for the augmenter to write into background voxels of a synthesis tissue map; None without any."""
    if not context_classes:
        return None
    from .synth import context_tissues

    return [(num_classes + i, context_tissues(name)) for i, name in enumerate(context_classes)]


def with_context_outputs(state: dict, target: dict, num_classes: int) -> dict:
    """``state`` (a network's weights with ``num_classes`` outputs) fitted to ``target``'s shapes, whose output
    layers have context channels after them: each parameter whose first dimension is ``num_classes`` in
    ``state`` and larger in ``target`` (the output convolutions and their biases, deep supervision heads
    included) gets copies of its background row (index 0) appended, and the background biases lose
    log(1 + copies): softmax then gives background and each copy a share of what background had, and as inference
    adds the context classes back to background, the grown network predicts exactly what the old one did until
    training moves them apart."""
    out = {}
    for key, value in state.items():
        want = target.get(key)
        if (want is not None and value.dim() >= 1 and value.shape[0] == num_classes and want.shape[0] > num_classes
                and tuple(value.shape[1:]) == tuple(want.shape[1:])):
            extra = want.shape[0] - num_classes
            value = torch.cat([value, value[:1].repeat((extra,) + (1,) * (value.dim() - 1))], dim=0)
            if value.dim() == 1:  # a bias: background's share of the probability split 1 + extra ways
                value = value.clone()
                value[0] -= math.log(1 + extra)
                value[num_classes:] -= math.log(1 + extra)
        out[key] = value
    return out


_BATCH_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def without_batch_statistics(state: dict, target: dict) -> dict:
    """``state`` without the batch-norm running statistics that ``target`` has no place for: the weights of a
    batch-norm network for the same network with instance norm (affine), which normalises every patch by its own
    statistics. The convolutions and the norms' learnt scale and shift carry over; any other mismatch is left for
    ``load_state_dict`` to report."""
    return {k: v for k, v in state.items() if k in target or k.rsplit(".", 1)[-1] not in _BATCH_STATISTICS}
