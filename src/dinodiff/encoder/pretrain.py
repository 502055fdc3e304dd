"""`dinodiff pretrain-encoder`: DINO self-distillation of a ViT on prepared images, with accelerate.

Same conventions as the diffusion trainer (`dinodiff.train`): CPU, one or many GPUs through accelerate;
`RUN/config.yaml`, `RUN/metrics.csv`, TensorBoard in `RUN/logs/`, a progress bar; checkpoints in
`RUN/checkpoints/checkpoint-STEP/` (accelerate state of the student, optimizer, lr schedule and RNGs;
`trainer/` with the teacher, the loss centre and `state.json`; `encoder/`, the teacher exported) written
under a temporary name and renamed when complete; a killed run resumes from its newest checkpoint and,
because every batch is a pure function of (seed, step) (see encoder/data.py), ends bit-identical to an
uninterrupted one. The output, `RUN/encoder/` (or `run.out`), is the teacher's backbone (DINO evaluates
the teacher), loadable as `model.encoder.name_or_path=ENC`; `RUN/encoder-init/` is the same
architecture at step 0, the random baseline to probe against. Every encoder folder it writes records the
images it was fitted to (`training_images.json`), so that `probe-encoder` can probe others.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.loss.capi_loss import sinkhorn_knopp
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dinodiff import runs
from dinodiff.devices import resolve_mixed_precision
from dinodiff.encoder.augment import MultiCrop
from dinodiff.encoder.data import StepBatches, batch_loader, load_images
from dinodiff.encoder.dino import (
    build_student_teacher,
    ema_update,
    lr_factor,
    momentum_at,
    param_groups,
    set_teacher_mode,
    teacher_temp_at,
)
from dinodiff.encoder.export import save_encoder_folder, settings_record
from dinodiff.encoder.monitor import CollapseMonitor, EncoderCollapsed, teacher_stats
from dinodiff.encoder.settings import EncoderPretrainSettings, to_container

logger = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "loss", "koleo", "lr", "momentum", "teacher_temp", "teacher_entropy", "teacher_marginal_entropy",
                 "embedding_std", "grad_norm", "images_per_s", "elapsed_s"]


class EncoderDiverged(RuntimeError):
    """A non-finite DINO loss; nothing is saved after the last checkpoint."""


def _maybe_inject_fault(step: int) -> None:
    """Tests kill the process mid-step (after backward, before the update) via DINODIFF_KILL_AT_STEP."""
    if os.environ.get("DINODIFF_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class EncoderPretrainer:
    def __init__(self, settings: EncoderPretrainSettings) -> None:
        self.s = s = settings
        self.run_dir = Path(s.run.run_dir)
        self.accelerator = acc = Accelerator(
            mixed_precision=resolve_mixed_precision(s.run.mixed_precision), log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        if s.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = load_images(s.data.shards, s.data.split, s.data.load_size, s.data.max_images)
        self.images = self.data.images
        grey = self.images.float() / 255
        mean, std = float(grey.mean()), float(grey.std().clamp_min(1e-3))
        set_seed(s.run.seed)  # identical initial weights on every rank
        self.student, self.teacher = build_student_teacher(s, [mean] * 3, [std] * 3)
        self.criterion = DINOLoss(s.head.output_dim, warmup_teacher_temp=s.loss.warmup_teacher_temp,
                                  teacher_temp=s.loss.teacher_temp, student_temp=s.loss.student_temp,
                                  center_momentum=1.0 if s.loss.centering == "sinkhorn" else s.loss.center_momentum)
        optimizer = torch.optim.AdamW(param_groups(self.student, s.optim.weight_decay), lr=s.optim.lr)
        ratio = s.optim.min_lr / s.optim.lr if s.optim.lr else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: lr_factor(t, s.optim.warmup_steps, s.run.max_steps, ratio))
        self.student, self.optimizer, self.lr_scheduler = acc.prepare(self.student, optimizer, scheduler)
        self.teacher.to(acc.device)
        self.criterion.to(acc.device)
        self.koleo = KoLeoLoss()
        self.monitor = CollapseMonitor(s.run.collapse_std_ratio, s.run.collapse_entropy, s.run.collapse_patience,
                                       s.head.output_dim)
        self.step = 0

    @property
    def images_per_step(self) -> int:
        return self.s.run.batch_size * self.accelerator.num_processes

    # ------------------------------------------------------------------------------------ loop
    def run(self) -> Path:
        acc, s = self.accelerator, self.s
        runs.start_run(acc, self.run_dir, to_container(s))
        if acc.is_main_process and not (self.run_dir / "encoder-init").is_dir():  # the ViT at step 0, before resuming
            save_encoder_folder(acc.unwrap_model(self.student), self.run_dir / "encoder-init",
                                s.backbone.image_size, self._provenance(step=0), self.data.record(step=0))
        self._maybe_resume()
        metrics = runs.MetricsLog(self.run_dir / "metrics.csv", METRIC_FIELDS)
        if acc.is_main_process:
            metrics.truncate_after(self.step)
            acc.init_trackers("dinodiff-encoder")
        logger.info("DINO pretraining %d steps from step %d on %d images, %d images/step", s.run.max_steps,
                    self.step, len(self.images), self.images_per_step)
        bar = tqdm(total=s.run.max_steps, initial=self.step, disable=not acc.is_main_process, desc="pretrain-encoder",
                   unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)
        start, window_start, window_steps = time.time(), time.time(), 0
        for crops in self._batches():
            row = self._optimizer_step(crops)
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.step % s.run.log_every == 0 or self.step == s.run.max_steps:
                row["images_per_s"] = window_steps * self.images_per_step / max(time.time() - window_start, 1e-9)
                row["elapsed_s"] = time.time() - start
                self._log(metrics, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", std=f"{row['embedding_std']:.2f}")
                window_start, window_steps = time.time(), 0
            if self.step % s.run.checkpoint_every == 0 or self.step == s.run.max_steps:
                self._save_checkpoint()
        bar.close()
        out = s.out_dir
        if acc.is_main_process:
            save_encoder_folder(self.teacher, out, s.backbone.image_size, self._provenance(self.step),
                                self.data.record(self.step))
            logger.info("encoder written to %s", out)
        acc.wait_for_everyone()
        acc.end_training()
        return out

    def _batches(self):
        s, acc = self.s, self.accelerator
        dataset = StepBatches(self.images, MultiCrop(s.augment, s.backbone.image_size), first_step=self.step,
                              last_step=s.run.max_steps, batch_size=s.run.batch_size, rank=acc.process_index,
                              world=acc.num_processes, seed=s.run.seed)
        # Starting the loader draws from the global RNG (worker seeds): keep that out of the training RNG,
        # so that a resumed run's drop-path draws match an uninterrupted run's.
        with torch.random.fork_rng(devices=[]):
            iterator = iter(batch_loader(dataset, s.data.num_workers))
        for crops in iterator:
            yield [c.to(acc.device) for c in crops]

    def _optimizer_step(self, crops: list[torch.Tensor]) -> dict:
        acc, s, step = self.accelerator, self.s, self.step
        temp = teacher_temp_at(step, s.loss.warmup_teacher_temp_steps, s.loss.warmup_teacher_temp, s.loss.teacher_temp)
        self.student.train()
        set_teacher_mode(self.teacher)
        with torch.no_grad(), acc.autocast():
            teacher_out, teacher_emb = self.teacher(crops[:2])
        targets = self._teacher_targets(teacher_out, temp)
        with acc.autocast():
            student_out, student_emb = self.student(crops)
            # DINOLoss applies softmax((x - centre) / temp); x = temp * log(targets) with a zero centre gives the targets
            teacher_in = [t.float() for t in teacher_out] if targets is None else list(temp * targets.log())
            dino = self.criterion(teacher_in, [o.float() for o in student_out], teacher_temp=temp)
            koleo = sum(self.koleo(e.float()) for e in student_emb.chunk(2)) / 2
            loss = dino + s.loss.koleo_weight * koleo
        losses = acc.gather(torch.stack([dino.detach(), koleo.detach()])[None])
        if not torch.isfinite(losses).all():  # every rank sees every rank's loss: all stop together
            raise EncoderDiverged(f"non-finite DINO loss {losses.tolist()} at step {step + 1}; nothing was saved after "
                                  "the last checkpoint. Lower optim.lr or set optim.max_grad_norm.")
        acc.backward(loss)
        _maybe_inject_fault(step + 1)
        grad_norm = float("nan")
        if s.optim.max_grad_norm:
            grad_norm = float(acc.clip_grad_norm_(self.student.parameters(), s.optim.max_grad_norm))
        acc.unwrap_model(self.student).head.cancel_last_layer_gradients(step)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        momentum = momentum_at(step, s.run.max_steps, s.run.momentum_start, s.run.momentum_end)
        ema_update(acc.unwrap_model(self.student), self.teacher, momentum)
        if targets is None:
            targets = ((torch.stack(teacher_out).float() - self._center_before) / temp).softmax(-1)
        stats = teacher_stats(targets, acc.gather(teacher_emb.float()))
        return {"step": step + 1, "loss": float(losses[:, 0].mean()), "koleo": float(losses[:, 1].mean()),
                "lr": self.lr_scheduler.get_last_lr()[0], "momentum": momentum, "teacher_temp": temp, "grad_norm": grad_norm, **stats}

    def _teacher_targets(self, teacher_out: list[torch.Tensor], temp: float) -> torch.Tensor | None:
        """DINOv2's Sinkhorn-Knopp targets (V, B, K), balanced over the global batch; None for DINO's EMA centre."""
        self._center_before = self.criterion.center.detach().clone().float()
        if self.s.loss.centering != "sinkhorn":
            return None
        logits = torch.stack(teacher_out, dim=1).float() / temp  # (B, V, K): one balancing per global crop
        q = sinkhorn_knopp(logits, iterations=3, gather_distributed=True)
        return q.transpose(0, 1).clamp_min(1e-12)

    def _log(self, metrics: runs.MetricsLog, row: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            metrics.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            acc.log({k: v for k, v in row.items() if k != "step" and math.isfinite(v)}, step=self.step)
        problem = self.monitor.check(row, self.step)
        if problem is None:
            return
        if self.s.run.stop_on_collapse:
            raise EncoderCollapsed(problem)
        logger.warning("%s (run.stop_on_collapse=false: continuing)", problem)

    # -------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> Path:
        return runs.save_checkpoint(self.accelerator, self.run_dir, self.step, self.s.run.keep_last,
                                    self._write_own_state, state={"monitor_count": self.monitor.count})

    def _write_own_state(self, staging: Path) -> None:
        """Into a checkpoint, from the main process: the teacher and the loss centre, and encoder/."""
        if not self.accelerator.is_main_process:
            return
        state = {f"teacher.{k}": v.detach().contiguous() for k, v in self.teacher.state_dict().items()}
        state["loss.center"] = self.criterion.center.detach().contiguous()
        save_file(state, str(staging / "trainer" / "teacher.safetensors"))
        save_encoder_folder(self.teacher, staging / "encoder", self.s.backbone.image_size, self._provenance(self.step),
                            self.data.record(self.step))

    def _maybe_resume(self) -> None:
        self.step = runs.resume_checkpoint(self.accelerator, self.run_dir, self.s.run.resume, self._restore_own_state)

    def _restore_own_state(self, found: Path, state: dict) -> None:
        saved = load_file(str(found / "trainer" / "teacher.safetensors"), device=str(self.accelerator.device))
        self.criterion.center.copy_(saved.pop("loss.center"))
        self.teacher.load_state_dict({k[len("teacher."):]: v for k, v in saved.items()})
        self.monitor.count = int(state.get("monitor_count", 0))

    def _provenance(self, step: int) -> dict:
        s = self.s
        return {"kind": "dinodiff-dino-pretrained-encoder", "step": step, "images_seen": step * self.images_per_step,
                "objective": (f"DINO (lightly DINOLoss, DINOProjectionHead; {s.loss.centering} centring; KoLeo weight "
                              f"{s.loss.koleo_weight}); the EMA teacher's backbone is exported"),
                "data": {"shards": str(Path(s.data.shards).resolve()), "split": s.data.split,
                         "num_images": len(self.images), "load_size": s.data.load_size},
                "settings": settings_record(s)}


def pretrain_encoder(settings: EncoderPretrainSettings) -> Path:
    """Pretrain (or resume) the encoder run described by `settings`; returns the encoder folder."""
    return EncoderPretrainer(settings).run()
