"""Optimisation: the Trainer (accumulated steps, mixed precision, DDP sync only where a step ends,
a moving average of the weights), AdamW, the learning-rate schedules, class weights, and the
scores of a pass over a split (validation during training, uncalibrated)."""

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import metrics
from backbones import SkinLesionModel, network_outputs
from devices import autocast
from lesion_labels import CLASS_NAMES, MELANOMA, NON_MELANOMA
from scoring import melanoma_probability
from training_data import batches_with_readable_errors


@dataclass
class Scores:
    """Per-image results of one pass over a split: true label, melanoma probability, loss."""

    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, labels, probabilities, losses):
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=int)])
        self.probabilities = np.concatenate([self.probabilities, np.asarray(probabilities, dtype=float)])
        self.losses = np.concatenate([self.losses, np.asarray(losses, dtype=float)])

    def loss(self):
        return float(self.losses.mean())

    def accuracy_at_half(self):
        """Accuracy at probability 0.5, the training-time figure; the stored threshold is chosen
        only for the best epoch, and the checkpoint's val_metrics report accuracy there."""
        return metrics.accuracy(self.labels, self.probabilities, 0.5)

    def auc(self):
        return metrics.roc_auc(self.labels, self.probabilities)


def gather_scores(scores, runtime):
    """All processes' scores, in every process (so all of them take the same decisions)."""
    if runtime.world_size == 1:
        return scores
    parts = [None] * runtime.world_size
    dist.all_gather_object(parts, scores)
    gathered = Scores()
    for part in parts:
        gathered.add(part.labels, part.probabilities, part.losses)
    return gathered


def score_split(model, loader, device, melanoma_index, description="Scoring", show_progress=True):
    """Uncalibrated scores of a split (during training there is no calibration yet), in fp32;
    `melanoma_index` is the index of the head's melanoma output."""
    model = getattr(model, "module", model).eval()  # the bare model: no DDP collectives while scoring
    scores = Scores()
    batches = batches_with_readable_errors(loader)
    for images, labels in tqdm(batches, description, len(loader), leave=False, disable=not show_progress):
        logits = network_outputs(model, images, device)[0]
        probabilities = melanoma_probability(logits, melanoma_index=melanoma_index)
        labels = labels.numpy()
        scores.add(labels, probabilities, metrics.cross_entropy(labels, probabilities))
    return scores


def accumulation_groups(num_samples, batch_size, accumulation_steps):
    """Images in each optimiser step's group of micro-batches; the epoch's last group may be short."""
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    return [sum(sizes[i : i + accumulation_steps]) for i in range(0, len(sizes), accumulation_steps)]


@dataclass
class Trainer:
    """One model's optimisation: accumulated steps, mixed precision, an optional per-step schedule,
    an optional moving average of the weights. `melanoma_index` is the head's melanoma output:
    the loader's targets are labels or diagnoses, and the scores are always melanoma or not."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None = None
    accumulation_steps: int = 1
    class_weights: torch.Tensor | None = None
    step_scheduler: LambdaLR | None = None
    scaler: torch.amp.GradScaler = None
    memory_format: torch.memory_format = torch.channels_last  # faster convolutions on CPU and GPU
    melanoma_index: int = MELANOMA
    ema: AveragedModel | None = None

    def __post_init__(self):
        if self.scaler is None:
            # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def train_one_epoch(self, loader, description="Training", show_progress=True):
        """One pass over `loader`. Each micro-batch's summed loss is divided by the number of images
        in its accumulation group, so every step follows the mean loss of exactly the images it saw
        (batch 8 x 4 steps like batch 32 x 1), and a short last group is applied, not dropped."""
        self.model.train()
        groups = accumulation_groups(len(loader.sampler), loader.batch_size, self.accumulation_steps)
        scores = Scores()
        bar = tqdm(batches_with_readable_errors(loader), description, len(loader), disable=not show_progress)
        for index, (images, targets) in enumerate(bar):
            group = index // self.accumulation_steps
            ends_group = index + 1 == min((group + 1) * self.accumulation_steps, len(loader))
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self.gradient_sync(ends_group):
                with autocast(self.device, self.amp_dtype):
                    logits = self.model(images)
                losses = F.cross_entropy(logits.float(), targets, weight=self.class_weights, reduction="none")
                self.scaler.scale(losses.sum() / groups[group]).backward()
            if ends_group:
                self.step()
            probabilities = torch.softmax(logits.detach().float(), dim=1)[:, self.melanoma_index]
            labels = (targets == self.melanoma_index).long()
            scores.add(labels.cpu(), probabilities.cpu(), losses.detach().cpu())
            bar.set_postfix(
                loss=f"{scores.loss():.4f}", acc_at_half=f"{100 * scores.accuracy_at_half():.1f}%"
            )
        return scores

    def gradient_sync(self, ends_group):
        """DDP averages gradients across processes only on the micro-batch that ends a group."""
        if ends_group or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_scheduler is not None:
            self.step_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(getattr(self.model, "module", self.model))


def class_weights(labels, mode, device, head):
    """Inverse frequency of melanoma and non-melanoma in train/ ('balanced'), mean weight 1 over
    the images: a no-op on balanced training data. A diagnosis head gives every non-melanoma
    output the non-melanoma weight, so melanoma against the rest keeps the balance of a
    two-class head and the other diagnoses keep their natural shares among the rest."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    binary = len(labels) / (len(counts) * counts)
    weights = np.full(head.size, binary[NON_MELANOMA])
    weights[head.melanoma_index] = binary[MELANOMA]
    return torch.tensor(weights, dtype=torch.float32, device=device)


def weight_average(args, model):
    """The exponential moving average of the weights (--ema-decay), batch-norm statistics
    included, on the model's device; None when turned off."""
    if not args.ema_decay:
        return None
    model = getattr(model, "module", model)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)


def warmup_cosine(warmup_steps, total_steps):
    """LR factor per optimiser step: linear warm-up (a new random head must not wreck the
    pretrained backbone with large early steps), then cosine decay to 0 at the last epoch."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_model(args, runtime, resume_state, head):
    """The model on its device; under DDP only rank 0 loads pretrained weights (DDP copies them)."""
    torch.manual_seed(args.seed)  # the new head starts the same in every run with this seed
    weights = args.weights if runtime.is_main and resume_state is None else "none"
    model = SkinLesionModel(args.arch, weights=weights, num_classes=head.size)
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
    model = model.to(runtime.device, memory_format=torch.channels_last)
    if runtime.world_size > 1:
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def make_optimizer(parameters, device, lr, weight_decay):
    """AdamW, fused into one kernel on the devices torch fuses it for: the unfused step's many
    small per-parameter operations cost a CPU several times more (docs/measurements.md)."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def parameter_groups(model, lr, backbone_lr_scale):
    """The optimiser's groups: every weight at `lr`, or, with a scale other than 1, the new head at
    `lr` and the backbone at `lr * backbone_lr_scale`, so pretrained features move less while the
    head learns. The head comes first: its rate is the peak the logs report."""
    if backbone_lr_scale == 1:
        return [{"params": list(model.parameters()), "lr": lr}]
    head = list(getattr(model, "module", model).efficientnet.classifier.parameters())
    in_head = {id(parameter) for parameter in head}
    backbone = [parameter for parameter in model.parameters() if id(parameter) not in in_head]
    return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]


def build_trainer(args, runtime, model, loader, head):
    groups = parameter_groups(model, args.lr, args.backbone_lr_scale)
    optimizer = make_optimizer(groups, runtime.device, args.lr, args.weight_decay)
    step_scheduler = None
    if args.schedule == "cosine":
        steps_per_epoch = len(
            accumulation_groups(len(loader.sampler), args.batch_size, args.accumulation_steps)
        )
        warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
        step_scheduler = LambdaLR(optimizer, warmup_cosine(warmup_steps, args.epochs * steps_per_epoch))
    labels = np.asarray(loader.dataset.labels)
    return Trainer(
        model,
        optimizer,
        runtime.device,
        runtime.amp_dtype,
        args.accumulation_steps,
        class_weights(labels, args.class_weights, runtime.device, head),
        step_scheduler,
        melanoma_index=head.melanoma_index,
        ema=weight_average(args, model),
    )


def plateau_scheduler(args, trainer, monitor):
    """The original's schedule: LR x0.1 once the monitored metric has not improved for 2 epochs."""
    if args.schedule != "plateau":
        return None
    return ReduceLROnPlateau(
        trainer.optimizer, mode="max" if monitor == "val_auc" else "min", factor=0.1, patience=2
    )
