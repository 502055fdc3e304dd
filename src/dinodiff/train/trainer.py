"""The accelerate training loop of DiNO-Diffusion (single CPU/GPU, DDP, multi-node).

One optimizer step = `grad_accum` micro-batches of `batch_size` per process. The data stream is cut
into segments of `checkpoint_every` steps, each seeded by (seed, segment, rank): a resumed run
rebuilds the segment it stopped in and skips the batches it had used, so it sees exactly the
batches an uninterrupted run would have seen, without replaying the whole history.

The learning-rate schedule counts optimizer steps, whatever the number of processes and the gradient
accumulation: it is stepped here once per optimizer step, not handed to `accelerate.prepare`, whose
`AcceleratedScheduler` steps it once per process (with split_batches=False), which would shorten the
paper's 1000-step warm-up to 250 steps on 4 GPUs. Its state is saved in `trainer/lr_scheduler.pt`.

Under DDP the main process alone draws sample grids, writes model folders and evaluates (FID), which
can take far longer than NCCL's 10-minute collective timeout. The other processes wait for it in a
barrier of their own (a gloo group whose timeout is `train.eval_timeout_s`), never in a training
collective (whose timeout is `train.dist_timeout_s`). An evaluation hook that says it runs spread over the
processes (`hook.all_ranks = True`, as the FID hook does) is called on every process instead.

No step reads a device value on the host: the loss and gradient norm stay on the device (`train.stats`) and are
read every `train.log_every` steps and before any sample grid, checkpoint or evaluation. A non-finite loss or
gradient norm therefore stops training at the latest at that read, naming the step it happened at, and no
checkpoint is written after it. GPU settings (channels-last, torch.compile, TF32, fused AdamW, the SDPA backend)
are applied by `train.performance`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from dinodiff import runs
from dinodiff.config import TrainingSettings
from dinodiff.devices import resolve_mixed_precision
from dinodiff.models.denoiser import ConditionedUNet
from dinodiff.models.factory import Components, build_components
from dinodiff.pipeline import save_model_folder
from dinodiff.runs import EvalHook
from dinodiff.train.data import TrainData, check_data_config
from dinodiff.train.performance import make_optimizer, sdpa_backend, tune_components
from dinodiff.train.samples import save_reconstruction_grid
from dinodiff.train.stats import StatsReading, StepStats

logger = logging.getLogger(__name__)

# One row every train.log_every steps; loss and grad_norm are means over the steps since the previous row (and
# over the processes), images_per_s over that window.
METRIC_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "images_seen", "elapsed_s"]
# (model folder, step) -> {"fid": ...} (lower first value is better). Called on the main process only, unless the
# hook has `all_ranks = True`: then on every process (each does its share; the main one returns the scores).


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the step is abandoned and no checkpoint is written."""


def main_wait_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group in which the other processes wait, up to `timeout_s`, while the main process works alone.

    Its own group, so waiting for an evaluation never counts against the training collectives' timeout
    (NCCL's is 10 minutes); gloo, so it works under NCCL and on CPUs alike. None with one process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _maybe_inject_fault(step: int) -> None:
    """Tests kill the process mid-step (after backward, before the update) via DINODIFF_KILL_AT_STEP."""
    if os.environ.get("DINODIFF_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    def __init__(self, cfg: TrainingSettings, eval_hook: EvalHook | None = None):
        self.cfg, self.eval_hook = cfg, eval_hook
        tcfg = cfg.train
        check_data_config(cfg)
        self.run_dir = Path(tcfg.run_dir)
        timeout = [InitProcessGroupKwargs(timeout=timedelta(seconds=tcfg.dist_timeout_s))] if tcfg.dist_timeout_s else []
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(tcfg.mixed_precision),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            kwargs_handlers=timeout,
        )
        acc = self.accelerator
        self._main_wait = main_wait_group(tcfg.eval_timeout_s)
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        set_seed(tcfg.seed)  # identical initial weights on every rank
        self.parts: Components = build_components(cfg.model)
        parts = self.parts
        for frozen in (parts.encoder, parts.autoencoder):
            frozen.requires_grad_(False).eval().to(acc.device)
        if tcfg.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
        self._set_attention(tcfg.attention)
        tune_components(parts, tcfg, acc.device)
        self.model = ConditionedUNet(parts.unet, parts.projection)
        self.ema = EMAModel(self.model.parameters(), decay=tcfg.ema_decay, foreach=True) if tcfg.ema else None
        self.optimizer = make_optimizer(self.model.parameters(), cfg.optim, acc.device.type == "cuda")
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        # Counts optimizer steps; deliberately not prepared (module docstring).
        self.lr_scheduler = get_scheduler(cfg.optim.lr_schedule, self.optimizer,
                                          num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=tcfg.max_steps)
        if self.ema is not None:
            self.ema.to(acc.device)
        # Noise, timesteps, latent sampling and condition dropout draw from this generator only, so
        # data-loading randomness can never shift them; its state is saved per rank.
        self.generator = torch.Generator(device=acc.device).manual_seed(tcfg.seed * 1000 + acc.process_index)
        self.data = TrainData(cfg, parts, process_index=acc.process_index, num_processes=acc.num_processes)
        self.stats = StepStats(acc.device)
        self.step = 0

    # ----------------------------------------------------------------------------------- setup
    def _set_attention(self, choice: str) -> None:
        unet = self.parts.unet
        wants_xformers = choice == "xformers" or (choice == "auto" and self.accelerator.device.type == "cuda")
        if wants_xformers:
            try:
                unet.enable_xformers_memory_efficient_attention()
                logger.info("attention: xformers memory-efficient attention")
                return
            except Exception as err:  # noqa: BLE001 - xformers raises several types when missing/unsupported
                if choice == "xformers":
                    raise ValueError(f"train.attention=xformers but xformers is unusable here: {err}") from err
        logger.info("attention: PyTorch scaled_dot_product_attention (SDPA)")

    # ------------------------------------------------------------------------------------ loop
    def run(self) -> Path:
        acc, tcfg = self.accelerator, self.cfg.train
        runs.start_run(acc, self.run_dir, self.cfg, wait=self._wait_for_main)
        self._maybe_resume()
        metrics = runs.MetricsLog(self.run_dir / "metrics.csv", METRIC_FIELDS)
        if acc.is_main_process:
            metrics.truncate_after(self.step)
            acc.init_trackers("dinodiff")
        images_per_step = tcfg.batch_size * tcfg.grad_accum * acc.num_processes
        logger.info("training %d steps from step %d: %d images/step (%d per device x %d processes x %d accumulation)",
                    tcfg.max_steps, self.step, images_per_step, tcfg.batch_size, acc.num_processes, tcfg.grad_accum)
        # Redirected to a file, a progress bar redraws every 30 s instead of flooding the log.
        bar = tqdm(total=tcfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train",
                   unit="step", mininterval=0.5 if sys.stderr.isatty() else 30)
        start, window_start = time.time(), time.time()
        batches = self._batches()
        while self.step < tcfg.max_steps:
            loss, grad_norm = self._optimizer_step(batches)
            self.step += 1
            self.stats.add(loss, grad_norm, self.step, check_grad=acc.scaler is None)  # fp16's scaler skips inf steps
            bar.update(1)
            log, sample, save = (self._due(tcfg.log_every), self._due(tcfg.sample_every),
                                 self._due(tcfg.checkpoint_every))
            if log or sample or save:  # the one host read of the window, before anything is written
                reading = self._read_stats()
                if log:
                    self._log_row(metrics, reading, images_per_step, window_start, start)
                    bar.set_postfix(loss=f"{reading.loss:.4f}")
                    self.stats.reset()
                    window_start = time.time()
            if sample:
                self._sample_grid()
                self._wait_for_main()
            if save:
                saved = self._save_checkpoint()
                if tcfg.eval_every and self.step % tcfg.eval_every == 0:
                    self._evaluate(saved)
                    self._wait_for_main()
            if self.step % tcfg.checkpoint_every == 0:
                batches = self._batches()  # a new data segment starts here (see module docstring)
        bar.close()
        acc.end_training()
        return self.run_dir

    def _due(self, every: int) -> bool:
        """Every ``every`` steps and at the last one; never when ``every`` is 0 (train.sample_every=0)."""
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.train.max_steps)

    def _read_stats(self) -> StatsReading:
        """Read the window's figures (every process, one collective); stop on a non-finite loss or gradient."""
        reading = self.stats.read(self.accelerator)
        saved = self.step - self.step % self.cfg.train.checkpoint_every
        if self.step % self.cfg.train.checkpoint_every == 0:
            saved -= self.cfg.train.checkpoint_every  # this step's checkpoint is not written
        if reading.first_bad_loss is not None:
            raise TrainingDiverged(
                f"non-finite loss at step {reading.first_bad_loss} (seen at step {self.step}); nothing was saved "
                f"after checkpoint {max(saved, 0)}. Lower optim.lr, set optim.max_grad_norm, or use "
                "train.mixed_precision=no to find the cause.")
        if reading.first_bad_grad is not None:
            raise TrainingDiverged(f"non-finite gradient norm at step {reading.first_bad_grad} (seen at step "
                                   f"{self.step}); no checkpoint written after {max(saved, 0)}.")
        return reading

    def _log_row(self, metrics: runs.MetricsLog, reading: StatsReading, images_per_step: int, window_start: float,
                 start: float) -> None:
        speed = reading.steps * images_per_step / max(time.time() - window_start, 1e-9)
        lr = self.lr_scheduler.get_last_lr()[0]
        row = dict(step=self.step, loss=f"{reading.loss:.6f}", lr=f"{lr:.3e}", grad_norm=f"{reading.grad_norm:.4f}",
                   images_per_s=f"{speed:.2f}", images_seen=self.step * images_per_step,
                   elapsed_s=f"{time.time() - start:.1f}")
        if self.accelerator.is_main_process:
            metrics.append(row)
            self.accelerator.log({"loss": reading.loss, "lr": lr, "grad_norm": reading.grad_norm,
                                  "images_per_s": speed}, step=self.step)

    def _batches(self) -> Iterator[dict]:
        every = self.cfg.train.checkpoint_every
        segment = self.step // every
        skip = (self.step - segment * every) * self.cfg.train.grad_accum
        return self.data.batches(segment=segment, skip=skip)

    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step; returns its loss (mean over micro-batches, this process) and the gradient norm
        (None without optim.max_grad_norm), both still on the device: nothing here waits for the GPU."""
        acc, tcfg = self.accelerator, self.cfg.train
        self.model.train()
        total = torch.zeros((), device=acc.device)
        for micro in range(tcfg.grad_accum):
            batch = next(batches)
            sync = micro == tcfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model), sdpa_backend(tcfg.sdpa_backend):
                with acc.autocast():
                    loss = self._loss(batch)
                acc.backward(loss / tcfg.grad_accum)
            total += loss.detach().float() / tcfg.grad_accum
        _maybe_inject_fault(self.step + 1)
        grad_norm = None
        if self.cfg.optim.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16's scaler skipped the update: the schedule waits too
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return total, grad_norm

    def _loss(self, batch: dict) -> torch.Tensor:
        parts, tcfg, gen = self.parts, self.cfg.train, self.generator
        latents, c_glb = self.data.latents_and_condition(batch, gen)
        noise = torch.randn(latents.shape, generator=gen, device=latents.device)
        if tcfg.noise_offset:
            noise = noise + tcfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen, device=latents.device)
        sched = parts.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        if tcfg.cond_dropout > 0:  # the null condition is an all-zero c_GLB
            keep = torch.rand(latents.shape[0], generator=gen, device=latents.device) >= tcfg.cond_dropout
            c_glb = c_glb * keep[:, None, None].to(c_glb.dtype)
        pred = self.model(noisy, t, c_glb).float()
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        if tcfg.snr_gamma is None:
            return F.mse_loss(pred, target)
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=tcfg.snr_gamma) / (snr if sched.config.prediction_type == "epsilon" else snr + 1)
        per_item = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_item * weight).mean()

    # -------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> Path:
        return runs.save_checkpoint(self.accelerator, self.run_dir, self.step, self.cfg.train.keep_last,
                                    self._write_own_state, wait=self._wait_for_main)

    def _write_own_state(self, staging: Path) -> None:
        """Into a checkpoint: every rank's noise generator; from the main process the lr schedule, EMA and model/."""
        acc, trainer_dir = self.accelerator, staging / "trainer"
        torch.save(self.generator.get_state(), trainer_dir / f"generator_rank{acc.process_index}.pt")
        if acc.is_main_process:
            torch.save(self.lr_scheduler.state_dict(), trainer_dir / "lr_scheduler.pt")
            if self.ema is not None:
                torch.save(self.ema.state_dict(), trainer_dir / "ema.pt")
            self._write_model_folder(staging / "model")

    def _write_model_folder(self, folder: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        with self._ema_weights(model):
            save_model_folder(folder, unet=model.unet, projection=model.projection, autoencoder=self.parts.autoencoder,
                              noise_scheduler=self.parts.noise_scheduler, model_cfg=self.cfg.model,
                              encoder=self.parts.encoder, cond_dropout=self.cfg.train.cond_dropout)

    @contextlib.contextmanager
    def _ema_weights(self, model: torch.nn.Module):
        if self.ema is None:
            yield
            return
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            yield
        finally:
            self.ema.restore(model.parameters())

    def _maybe_resume(self) -> None:
        self.step = runs.resume_checkpoint(self.accelerator, self.run_dir, self.cfg.train.resume,
                                           self._restore_own_state)

    def _restore_own_state(self, found: Path, state: dict) -> None:
        self._restore_lr_scheduler(found / "trainer" / "lr_scheduler.pt", int(state["step"]))
        gen_file = found / "trainer" / f"generator_rank{self.accelerator.process_index}.pt"
        if gen_file.is_file():
            self.generator.set_state(torch.load(gen_file, map_location="cpu", weights_only=True))
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(found / "trainer" / "ema.pt", map_location="cpu", weights_only=True))
            self.ema.to(self.accelerator.device)

    def _restore_lr_scheduler(self, path: Path, step: int) -> None:
        if path.is_file():
            self.lr_scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        # A checkpoint from before the schedule was stepped here (its scheduler.bin counted process-steps):
        # the schedule is a function of the optimizer step, so replaying `step` steps rebuilds it exactly.
        logger.warning("%s is missing: rebuilding the learning-rate schedule at step %d.", path, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(step):
                self.lr_scheduler.step()

    # ------------------------------------------------------------------- samples, evaluation
    def _wait_for_main(self) -> None:
        """Every process meets here after work the main process did alone; the others wait up to
        train.eval_timeout_s (see main_wait_group)."""
        if self._main_wait is not None:
            dist.barrier(group=self._main_wait)

    def _sample_grid(self) -> None:
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with self._ema_weights(model), torch.no_grad():
            out = self.run_dir / "samples" / f"step-{self.step:07d}.png"
            save_reconstruction_grid(out, self.data.holdout_images(), model, self.parts,
                                     steps=self.cfg.train.sample_steps, seed=self.cfg.train.seed)

    def _evaluate(self, checkpoint: Path) -> None:
        if self.eval_hook is None:
            logger.warning("train.eval_every is set but no evaluation hook is installed; skipping.")
            return
        spread = bool(getattr(self.eval_hook, "all_ranks", False))  # the hook shares its work between processes
        if not (spread or self.accelerator.is_main_process):
            return
        scores = self.eval_hook(checkpoint / "model", self.step)
        if not self.accelerator.is_main_process or not scores:
            return
        name, value = next(iter(scores.items()))  # the hook's first score decides, as runs.keep_best says
        runs.keep_best(self.run_dir, checkpoint / "model",
                       {"step": self.step, "metric": scores.get("metric", name), "value": value, "scores": scores})
        self.accelerator.log({k: v for k, v in scores.items() if isinstance(v, (int, float))}, step=self.step)


def train(cfg: TrainingSettings, eval_hook: EvalHook | None = None) -> Path:
    """Train (or resume) the run described by `cfg`; returns the run folder.

    With train.eval_every > 0, `eval_hook` scores each such checkpoint (the CLI builds the FID hook from the
    config's `eval` section: `evaluate.fid.sweep.hook_from_config`).
    """
    return Trainer(cfg, eval_hook=eval_hook).run()
