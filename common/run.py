"""Run management: everything a training script's train() does that is not the method.

Every training script subclasses `RunArgs` (the flags below) and its train() reads:

    run = Run("simclr", args, runtime)                 # output folder, device, precision, NaN guard
    loader = run.loader(dataset, view_recipe(args))    # the recipe [(count, augment.View)]: both data paths
    model, core = run.wrap(SimCLR(args), sync_bn=args.sync_bn)   # device, SyncBN, DDP, torch.compile
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    state = run.resume(core, optimizer, scaler)        # the latest checkpoint's dict, or None
    run.start("a line describing the run")             # opens the log
    for epoch in run.epochs():                         # a checkpoint at every epoch's end
        for views, indices in run.batches(loader):     # the batch's views on the device
            ... the method: forward, loss ...
            mean_loss = run.sync(loss)                 # mean over processes; notes a preemption signal
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr):         # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr)      # counts the step; checkpoints follow it
    return run.finish()

With --eval-every N, `run.batches` also runs the online kNN monitor (common/knn.py) every N epochs' worth of
steps. `run.step` is the number of optimizer steps taken (restored by resume). `run.batches`
stops at --max-steps, counts unreadable images, and after each step writes the
--checkpoint-every checkpoints and, when a process was signalled (SIGTERM/SIGUSR1), a
last checkpoint before exiting with status 75. Each checkpoint holds the model,
optimizer, grad scaler, RNG states, step, args and the trunk's weights (docs/design.md),
plus whatever `run.save_also(fn)` returns at that moment (a method's queue, memory bank,
pseudo-labels ...); `fn` runs on every process, so it may gather across processes.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from common import augment, checkpoint, cli, data, dist, models, speed
from common.guard import StepGuard
from common.knn import KnnMonitor
from common.log import MetricLogger


@dataclass
class RunArgs:
    """The flags every training script shares; a script's `Args(RunArgs)` adds the method's and may re-declare a
    default (e.g. `output_dir`)."""
    data: str = ""
    workers: int = 8
    gpu_aug: str = field(default="auto", metadata={"choices": ["auto", "on", "off"]})
    compile: bool = False
    device: str = "auto"
    precision: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp16", "fp32"]})
    seed: int = 0
    output_dir: str = "runs"
    max_steps: int = 0
    data_fraction: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    nan_policy: str = field(default="stop", metadata={"choices": ["stop", "skip"]})
    max_nan_skips: int = 20
    max_bad_fraction: float = 0.01
    print_every: int = 10
    resume: bool = True
    eval_every: float = field(default=0.0, metadata={
        "help": "online kNN of the trunk every N epochs (fractions allowed; 0: off), logged with the losses"})
    eval_data: str = field(default="", metadata={
        "help": "its labelled held-out images (default: --data's test split, or val/test beside train)"})
    eval_bank: int = field(default=1000, metadata={"help": "training images in its kNN bank (class-balanced)"})
    eval_size: int = field(default=1000, metadata={"help": "held-out images it classifies (class-balanced)"})
    eval_image_size: int = field(default=0, metadata={"help": "its centre-crop size (0: the first view's size)"})


def launch(train, args_cls, presets, doc, argv=None):
    """A training script's main(): parse the command line, seed, set up the processes, train."""
    args = cli.parse_args(args_cls, presets, argv, description=doc.split("\n")[0])
    torch.manual_seed(args.seed)
    runtime = dist.setup(args.device)
    try:
        return train(args, runtime)
    finally:
        dist.cleanup()


class Run:
    """One training run's management. Attributes a script reads: device, precision, gpu_aug (views are made on
    the device), channels_last / memory_format, global_batch, steps_per_epoch, total_steps, n_images, step, epoch."""

    def __init__(self, method, args, runtime):
        self.method, self.args, self.runtime = method, args, runtime
        self.device = runtime.device
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if args.precision == "auto" \
            else args.precision
        checkpoint.prepare_output_dir(args.output_dir)
        self.gpu_aug = speed.use_gpu_aug(args.gpu_aug, self.device)
        self.channels_last = speed.channels_last(self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.global_batch = args.batch_size * runtime.world_size
        self.step, self.epoch = 0, 0
        self.last_path, self.saved_step = None, 0  # the latest checkpoint, and the step it holds
        self.save_extra, self.logger, self.preempted, self.make_views = None, None, False, None
        self.monitor, self.eval_steps = None, 0
        self.guard = StepGuard(args.output_dir, args.nan_policy, args.max_nan_skips, args.max_bad_fraction,
                               precision=self.precision)

    # ------------------------------------------------------------------ data
    def dataset(self):
        """--data's training images, --data-fraction of them (class-balanced)."""
        return data.subset(data.build_dataset(self.args.data, "train"), self.args.data_fraction, self.args.seed)

    def view_dataset(self, dataset, views, seed=None, transform=None):
        """dataset -> items of (views, label, index, bad) for the recipe `views` ([(count, augment.View)]): the
        per-image path (augment.PerImage, or `transform` when given) in the workers, or with --gpu-aug decoded
        images whose views the device makes (self.device_views)."""
        seed = self.args.seed if seed is None else seed
        if self.gpu_aug and transform is None:
            return data.ViewDataset(data.DecodedImages(dataset, augment.max_side(views)), None, seed=seed)
        return data.ViewDataset(dataset, transform or augment.PerImage(views), seed=seed)

    def device_views(self, views, seed=None):
        """The batched path of the recipe `views` for --gpu-aug (augment.batched: common.speed.DeviceViews)."""
        return augment.batched(views, self.args.seed if seed is None else seed, self.channels_last)

    def loader(self, dataset, views, transform=None):
        """The training loader of `dataset` (None: `self.dataset()`), sharded over the processes, making the
        views of the recipe `views` ([(count, augment.View)]) on the path --gpu-aug picks. `transform`: the
        method's own per-image transform of a dataset item instead (e.g. one that also edits a caption), seeded
        per sample like augment.PerImage; it needs the per-image path (--gpu-aug off)."""
        dataset = self.dataset() if dataset is None else dataset
        self.train_images, self.view_size = dataset, views[0][1].size  # for the online kNN monitor
        if transform is not None and self.gpu_aug:
            raise ValueError(f"{self.method} makes its views per image in the data workers: use --gpu-aug off.")
        items = self.view_dataset(dataset, views, transform=transform)
        self.make_views = self.device_views(views)
        self.n_images = len(items)
        self.sampler = data.EpochSampler(len(items), self.runtime.rank, self.runtime.world_size, seed=self.args.seed)
        self.steps_per_epoch = self.sampler.num_samples // self.args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {self.args.batch_size} is larger than this process's share of the data "
                             f"({self.sampler.num_samples} of {len(items)} images over {self.runtime.world_size} "
                             f"processes).")
        self.total_steps = self.args.epochs * self.steps_per_epoch
        return self.build_loader(items)

    def build_loader(self, items):
        """A loader of `items` in this run's sampler's order (e.g. a second pass over the data)."""
        return data.build_loader(items, self.sampler, self.args.batch_size, self.args.workers, self.device,
                                 collate_fn=data.collate_canvas if self.gpu_aug else data.collate)

    def step_generator(self):
        """A CPU generator seeded by (seed, step, rank) only: per-batch draws of a method's own (RotNet's
        rotations, Jigsaw's tiles) that a resumed run replays exactly."""
        return torch.Generator().manual_seed((self.args.seed * 1_000_003 + self.step) * 4_099 + self.runtime.rank)

    def to_device(self, views, indices, make_views=None):
        """A loader batch's views on the device: made there with --gpu-aug, else moved (channels_last on CUDA)."""
        if self.gpu_aug:
            return (make_views or self.make_views)(views, self.epoch, indices, self.device)
        return speed.to_device(views, self.device, self.memory_format)

    # ------------------------------------------------------------------ model
    def wrap(self, model, sync_bn=False, compile=True, broadcast_buffers=True):
        """(the model to call, the bare module): on the device, SyncBN across GPUs, DDP, torch.compile."""
        model = model.to(self.device, memory_format=self.memory_format)
        if self.runtime.distributed and sync_bn and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        core = model
        if self.runtime.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=broadcast_buffers)
        if compile:
            model = speed.compile_model(model, self.args.compile)
        self.core = core
        return model, core

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def autocast(self):
        return dist.autocast(self.device, self.precision)

    # ------------------------------------------------------------------ checkpoints
    def latest_state(self):
        """The latest checkpoint's dict (validated for this method), or None with --no-resume or none yet; read
        once, and released by `resume` (which returns it)."""
        if not hasattr(self, "_state"):
            self.last_path = checkpoint.latest(self.args.output_dir) if self.args.resume else None
            self._state = None if self.last_path is None else checkpoint.load_training(self.last_path, self.method)
        return self._state

    def resume(self, core, optimizer, scaler):
        """Load the latest checkpoint's model, optimizer, scaler, RNG states and step; returns its dict (the
        method restores its own state from it) or None on a fresh start."""
        self.core, self.optimizer, self.scaler = core, optimizer, scaler
        state, self._state = self.latest_state(), None  # the caller holds it while it needs it, not the run
        if state is None:
            return None
        checkpoint.load_model(core, state["model"], self.last_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = self.saved_step = state["step"]
        if self.runtime.is_main:
            print(f"resumed from {self.last_path} at step {self.step}", flush=True)
        return state

    def save_also(self, fn):
        """Each checkpoint also holds the dict `fn()` returns then (called on every process)."""
        self.save_extra = fn

    def save(self):
        """A checkpoint of this step, written by the main process; every process waits for it."""
        self.saved_step, self.last_path = self.step, None
        extra = self.save_extra() if self.save_extra else {}
        if self.runtime.is_main:
            args, core = self.args, self.core
            self.last_path = checkpoint.save_training({
                "method": self.method, "args": cli.as_dict(args), "epoch": self.step // self.steps_per_epoch,
                "step": self.step, "world_size": self.runtime.world_size, "model": core.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(), **extra,
                "trunk": models.trunk_state_dict(core.trunk), "arch": args.arch, "cifar_stem": args.cifar_stem,
            }, args.output_dir, self.step, keep=args.keep_checkpoints)
        dist.barrier()

    # ------------------------------------------------------------------ the loop
    def start(self, description):
        """Open the log (metrics.jsonl, TensorBoard, progress lines) with a first line describing the run, after
        checking the online kNN monitor's settings (bad input leaves no file behind)."""
        if self.args.eval_every < 0:
            raise ValueError(f"--eval-every is a number of epochs (0: off), got {self.args.eval_every}.")
        if self.args.eval_every > 0:
            self.monitor = KnnMonitor(self.args, self.train_images, self.args.eval_image_size or self.view_size,
                                      self.device, self.precision)
            self.eval_steps = max(1, round(self.args.eval_every * self.steps_per_epoch))
        self.logger = MetricLogger(self.args.output_dir, self.total_steps, enabled=self.runtime.is_main,
                                   print_every=self.args.print_every)
        gpu_aug = "on" if self.gpu_aug else "off"
        self.logger.info(f"{self.method}: {self.n_images} images, {self.runtime.world_size} process(es) x batch "
                         f"{self.args.batch_size}, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                         f"{description}, {self.precision}, gpu-aug {gpu_aug}"
                         f"{', compiled' if self.args.compile else ''}")
        if self.monitor is not None:
            self.logger.info(f"{self.monitor.describe()}, every {self.eval_steps} steps")
        if self.runtime.is_main:  # what this run is, for common/report.py
            info = {"method": self.method, "args": cli.as_dict(self.args), "world_size": self.runtime.world_size,
                    "global_batch": self.global_batch, "images": self.n_images,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
            (Path(self.args.output_dir) / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n")

    def epochs(self):
        """The epochs left (a resumed run starts in its checkpoint's); a checkpoint after each; stops at
        --max-steps."""
        for epoch in range(self.step // self.steps_per_epoch, self.args.epochs):
            self.epoch = epoch
            yield epoch
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            self.save()

    def batches(self, loader):
        """This epoch's batches, from where a resumed run stopped: (views on the device, dataset indices)."""
        args = self.args
        self.sampler.set_epoch(self.epoch, start=(self.step % self.steps_per_epoch) * args.batch_size)
        for views, _, indices, bad in loader:
            if args.max_steps and self.step >= args.max_steps:
                break
            self.guard.count_images(args.batch_size, bad, self.logger)
            yield self.to_device(views, indices), indices
            if self.monitor is not None and self.step % self.eval_steps == 0:
                self.evaluate()
            if self.preempted:
                self.save()
                self.guard.exit_preempted(self.logger)
            if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                self.save()

    def evaluate(self):
        """The online kNN monitor now: logged (progress line, metrics.jsonl, TensorBoard); its time is left out of
        img/s. Every process takes part."""
        result = self.monitor(self.core.trunk)
        self.logger.pause(result["knn_seconds"])
        self.logger.evaluation(self.step, self.epoch, **result)
        return result

    def sync(self, loss):
        """The loss averaged over the processes (one all-reduce, which also shares a preemption signal)."""
        mean_loss, self.preempted = self.guard.sync(loss)
        return mean_loss

    def finite_loss(self, mean_loss, lr, inputs=(), terms=None):
        """True: go on; False: skip this batch (--nan-policy skip); raises with --nan-policy stop."""
        return self.guard.finite_loss(mean_loss, self.step, lr, inputs, terms, last_checkpoint=self.last_path)

    def finite_grads(self, core, mean_loss, lr, scaler=None, inputs=()):
        """As finite_loss, for the gradients (unscaled first with an fp16 scaler)."""
        return self.guard.finite_grads(core, self.step, lr, mean_loss, inputs, last_checkpoint=self.last_path,
                                       scaler=scaler)

    def log(self, **metrics):
        """One step done: count it and log its metrics (metrics.jsonl, TensorBoard, a line every --print-every)."""
        self.step += 1
        self.logger.step(self.step, self.epoch, self.global_batch, **metrics, bad_images=self.guard.bad_images)

    def finish(self):
        """The online kNN monitor if the last step had none, a last checkpoint if it has none; close the log;
        returns the step count."""
        if self.monitor is not None and self.step % self.eval_steps != 0:
            self.evaluate()
        if self.saved_step != self.step:
            self.save()
        self.logger.close()
        return self.step
