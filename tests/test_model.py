"""model.py: accumulation, augmentation, threshold rule, a real tiny run, resume, torchrun, bad input."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    TINY_IMAGE_SIZE,
    assert_one_line_error,
    make_prepared_folder,
    run_script,
    write_manifest,
)
from PIL import Image

import backbones
import checkpoints
import devices
import errors
import metrics
import model
import training
import training_data

TINY_RUN = f"--image-size {TINY_IMAGE_SIZE} --batch-size 4 --accumulation-steps 2 --weights none".split()
CHECKPOINT_KEYS = {"arch", "class_names", "image_size", "mean", "std", "threshold", "threshold_rule"}
CHECKPOINT_KEYS |= {"weights", "epoch", "val_metrics", "versions", "model_state"}
EPOCH_KEYS = {"epoch", "train_loss", "train_accuracy_at_0.5", "train_auc", "val_loss", "val_accuracy_at_0.5"}
EPOCH_KEYS |= {"val_auc"}
EPOCH_KEYS |= {"lr", "seconds", "train_seconds", "image_size", "selected", "ema_val_loss", "ema_val_auc"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared tree of real sample images: 12 train, 8 val, 6 test; its manifest records
    the diagnoses (train/: 6 melanomas, 4 nevi, 2 benign keratoses)."""
    root = tmp_path_factory.mktemp("prepared")
    for split, count in (("train", 6), ("val", 4), ("test", 3)):
        make_prepared_folder(root / split, count=count)
    write_manifest(root)
    return root


def tiny_args(data, out, *extra):
    return [*TINY_RUN, "--data", str(data), "--out", str(out), *map(str, extra)]


# --- gradient accumulation -------------------------------------------------------------------


def test_accumulation_groups_keep_the_short_last_group():
    assert training.accumulation_groups(36, 8, 4) == [32, 4]
    assert training.accumulation_groups(32, 8, 4) == [32]
    assert training.accumulation_groups(5, 8, 4) == [5]


def train_tiny_network(images, labels, batch_size, accumulation_steps):
    """One epoch of a small conv net without batch-norm or dropout, so only accumulation differs."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    trainer = training.Trainer(
        network,
        torch.optim.SGD(network.parameters(), lr=0.5),
        torch.device("cpu"),
        accumulation_steps=accumulation_steps,
        class_weights=torch.tensor([0.7, 1.6]),
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=batch_size
    )
    trainer.train_one_epoch(loader, show_progress=False)
    return [parameter.detach().clone() for parameter in network.parameters()]


@pytest.mark.parametrize("count", [32, 36])  # 36: the last group (4 images) is applied, not dropped
def test_accumulated_micro_batches_update_like_one_big_batch(count):
    generator = torch.Generator().manual_seed(1)
    images, labels = (
        torch.randn(count, 3, 8, 8, generator=generator),
        torch.randint(2, (count,), generator=generator),
    )
    accumulated = train_tiny_network(images, labels, batch_size=8, accumulation_steps=4)
    one_batch = train_tiny_network(images, labels, batch_size=32, accumulation_steps=1)
    untouched = train_tiny_network(images, labels, batch_size=32, accumulation_steps=1000)
    for mine, reference in zip(accumulated, one_batch, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    # The comparison means something: a different grouping gives a different result.
    if count == 36:
        assert not torch.allclose(untouched[0], one_batch[0])


# --- augmentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("augmentation", ["ours", "original"])
def test_train_augmentation_adds_no_fill(augmentation):
    """Every geometric change (crop, flip, quarter turn) of a uniform image stays uniform: no
    black corners or borders appear, whatever the random draw."""
    transform = training_data.train_transform(TINY_IMAGE_SIZE, augmentation)
    uniform = Image.new("RGB", (90, 60), (180, 120, 90))
    torch.manual_seed(0)
    for _ in range(20):
        image = transform(uniform)
        assert image.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        assert image.flatten(1).std(dim=1).max() < 1e-3


def augmentation_args(seed=3, progressive_from=0, epochs=3):
    return SimpleNamespace(
        seed=seed,
        image_size=TINY_IMAGE_SIZE,
        progressive_from=progressive_from,
        epochs=epochs,
        augmentation="ours",
        arch=backbones.DEFAULT_ARCH,
    )


def test_augmentation_depends_only_on_seed_epoch_and_index(prepared):
    images = training_data.SkinLesionDataset(prepared / "train", transform=None)
    dataset = training_data.ReproducibleAugmentation(images, images.labels, augmentation_args())
    before = torch.random.get_rng_state()
    first, label = dataset[(0, 1)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    assert torch.equal(dataset[(0, 1)][0], first) and label == images.labels[1]
    assert not torch.equal(dataset[(1, 1)][0], first)
    other_seed = training_data.ReproducibleAugmentation(images, images.labels, augmentation_args(seed=4))
    assert not torch.equal(other_seed[(0, 1)][0], first)


def test_progressive_resizing_grows_size_and_augmentation_to_the_final_ones(prepared):
    args = SimpleNamespace(image_size=160, progressive_from=96, epochs=5)
    sizes = [training_data.epoch_image_size(args, epoch) for epoch in range(5)]
    assert sizes == [96, 112, 128, 144, 160]
    strengths = [training_data.augmentation_strength(args, size) for size in sizes]
    assert strengths == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (
        training_data.epoch_image_size(SimpleNamespace(image_size=160, progressive_from=0, epochs=5), 0)
        == 160
    )
    assert (
        training_data.augmentation_strength(SimpleNamespace(image_size=160, progressive_from=0), 160) == 1.0
    )
    images = training_data.SkinLesionDataset(prepared / "train", transform=None)
    dataset = training_data.ReproducibleAugmentation(
        images, images.labels, augmentation_args(progressive_from=32)
    )
    assert [dataset[(epoch, 0)][0].shape[-1] for epoch in range(3)] == [32, 48, TINY_IMAGE_SIZE]


# --- the decision threshold -------------------------------------------------------------------


def test_threshold_is_the_highest_reaching_the_target_sensitivity():
    labels = [1] * 10 + [0] * 3
    probabilities = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1, 0.2, 0.25, 0.05]
    threshold, rule = metrics.choose_threshold(labels, probabilities, "auto", 0.9)
    assert threshold == 0.3  # catches 9 of 10 melanomas (0.9 exactly, despite 0.9 * 10 = 9.000...1)
    sensitivity, specificity = metrics.sensitivity_specificity(labels, probabilities, threshold)
    assert sensitivity == 0.9 and specificity == 1.0
    assert "sensitivity >= 0.9" in rule
    assert metrics.choose_threshold(labels, probabilities, "auto", 1.0)[0] == 0.1


def test_fixed_and_fallback_thresholds():
    threshold, rule = metrics.choose_threshold([1, 0], [0.9, 0.1], 0.5, 0.9)
    assert threshold == 0.5 and "fixed at 0.5" in rule
    threshold, rule = metrics.choose_threshold([0, 0], [0.9, 0.1], "auto", 0.9)
    assert threshold == 0.5 and "no melanoma" in rule


# --- presets and settings ---------------------------------------------------------------------


def test_preset_original_sets_its_recipe_and_explicit_flags_win():
    parser = model.get_args_parser()
    ours = model.parse_args(parser, [])
    assert (ours.schedule, ours.class_weights, ours.threshold, ours.augmentation) == (
        "cosine",
        "balanced",
        "auto",
        "ours",
    )
    original = model.parse_args(model.get_args_parser(), ["--preset", "original", "--lr", "0.01"])
    assert (original.schedule, original.monitor, original.class_weights) == ("plateau", "loss", "none")
    assert (original.threshold, original.augmentation, original.weight_decay) == (0.5, "original", 1e-5)
    assert original.lr == 0.01


def test_resume_refuses_to_change_what_the_run_computes():
    saved = vars(model.parse_args(model.get_args_parser(), ["--lr", "0.001", "--data", "old"]))
    merged = model.settings_for_resume(model.typed_settings(["--resume", "--workers", "0"]), saved)
    assert (merged.lr, merged.data, merged.workers, merged.resume) == (0.001, "old", 0, True)
    with pytest.raises(errors.UserError, match="--lr"):
        model.settings_for_resume(model.typed_settings(["--resume", "--lr", "0.5"]), saved)


def test_a_flag_typed_with_its_default_value_counts_as_typed():
    """--lr 3e-4 is the default: typed on a run saved at 1e-3 it is refused, not ignored."""
    saved = vars(model.parse_args(model.get_args_parser(), ["--preset", "original"]))
    assert model.typed_settings(["--resume", "--lr", "3e-4"]) == {"resume": True, "lr": 3e-4}
    with pytest.raises(errors.UserError, match="--lr 0.001 \\(not 0.0003\\)"):
        model.settings_for_resume(model.typed_settings(["--resume", "--lr", "3e-4"]), saved)
    # --fit-scoring-only --threshold auto on a checkpoint trained at a fixed 0.5: auto wins.
    argv = ["--fit-scoring-only", "--threshold", "auto"]
    args = model.parse_args(model.get_args_parser(), argv)
    meta = {"settings": {"threshold": 0.5, "target_sensitivity": 0.9}}
    assert model.threshold_rule_of_training(args, model.typed_settings(argv), meta).threshold == "auto"
    untyped = model.parse_args(model.get_args_parser(), ["--fit-scoring-only"])
    assert model.threshold_rule_of_training(untyped, {}, meta).threshold == 0.5


# --- real runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_unreadable_image_read_by_loader_workers_is_one_line_naming_it(prepared, tmp_path, split):
    """Training reads train/ and val/ in DataLoader worker processes, whose errors arrive with
    the worker's whole traceback as their message: the user sees the image's one line."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    broken = data / split / "nomel_ISIC_broken.jpg"
    intact = sorted((prepared / split).iterdir())[0]
    broken.write_bytes(intact.read_bytes()[:900])  # a truncated JPEG
    result = run_script("model.py", *tiny_args(data, tmp_path / "out", "--epochs", 1, "--workers", 2))
    assert_one_line_error(result)
    assert result.stderr.startswith(f"error: {broken}: not a readable image"), result.stderr


def test_training_run_writes_checkpoint_history_and_tests(prepared, tmp_path):
    """A user's run on the CPU: notice, per-epoch lines, loadable checkpoint, history, test report."""
    run = ["--epochs", 2, "--workers", 1, "--targets", "diagnosis", "--ema-decay", 0.5]
    result = run_script("model.py", *tiny_args(prepared, tmp_path, *run))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU found" in result.stdout and "random initialisation" in result.stdout
    assert (
        f"Epoch [1/2] {TINY_IMAGE_SIZE}px - Train Loss:" in result.stdout and "EMA Val AUC:" in result.stdout
    )
    assert "Diagnosis head: bkl 2, mel 6, nv 4 training images." in result.stdout
    assert "%|" not in result.stderr  # no tqdm bars in a pipe (the lines above are the log)
    assert "Classification Report:" in result.stdout and "ROC AUC:" in result.stdout

    saved = torch.load(tmp_path / model.BEST_CHECKPOINT, weights_only=True)
    assert saved.keys() >= CHECKPOINT_KEYS
    assert saved["image_size"] == TINY_IMAGE_SIZE and saved["weights"] == "none"
    assert (saved["targets"], saved["diagnoses"]) == ("diagnosis", ["bkl", "mel", "nv"])
    assert saved["model_state"]["efficientnet.classifier.1.weight"].shape[0] == 3
    assert saved["saved_weights"] in ("weights", "ema")
    assert set(saved["val_metrics"]) == {"auc", "loss", "accuracy", "sensitivity", "specificity"}
    assert saved["val_metrics"]["sensitivity"] >= 0.9  # the rule holds on the split it was chosen on
    loaded, meta = checkpoints.load_checkpoint(tmp_path / model.BEST_CHECKPOINT)
    assert meta["threshold"] == saved["threshold"]

    history = json.loads((tmp_path / model.HISTORY_FILE).read_text())
    assert (history["monitor"], history["device"]) == ("val_auc", "cpu")
    assert history["amp"] == devices.amp_name(devices.choose_amp_dtype(torch.device("cpu")))
    assert [epoch["epoch"] for epoch in history["epochs"]] == [1, 2]
    assert all(set(epoch) == EPOCH_KEYS for epoch in history["epochs"])
    assert history["best_epoch"] == saved["epoch"]
    assert (tmp_path / model.LAST_CHECKPOINT).is_file()


def test_one_class_validation_gives_null_auc_and_the_original_preset_runs(tmp_path):
    """--preset original end to end (plateau schedule, fixed 0.5); AUC is JSON null, not NaN."""
    make_prepared_folder(tmp_path / "data" / "train", count=3)
    make_prepared_folder(tmp_path / "data" / "val", count=3, labels=(0,))
    args = tiny_args(
        tmp_path / "data", tmp_path / "out", "--preset", "original", "--epochs", 1, "--workers", 0
    )
    model.main([*args, "--monitor", "auc"])
    history = json.loads((tmp_path / "out" / model.HISTORY_FILE).read_text())
    assert history["monitor"] == "val_loss" and history["epochs"][0]["val_auc"] is None
    saved = torch.load(tmp_path / "out" / model.BEST_CHECKPOINT, weights_only=True)
    assert saved["threshold"] == 0.5 and saved["val_metrics"]["auc"] is None
    assert saved["val_metrics"]["sensitivity"] is None  # no melanoma in validation


def test_resume_continues_to_the_same_result(prepared, tmp_path, monkeypatch):
    """Interrupted after epoch 1, then resumed (with a loader worker this time): the same weights,
    moving average and history as a run that was never interrupted (diagnosis head, progressive
    resizing, the weights' moving average and a backbone rate of its own on)."""
    run = ["--epochs", 2, "--patience", 5, "--progressive-from", 32, "--ema-decay", 0.5]
    run += ["--targets", "diagnosis", "--backbone-lr-scale", 0.5]
    model.main(tiny_args(prepared, tmp_path / "whole", *run, "--workers", 0))

    save_last = model.save_last_checkpoint

    def save_then_interrupt(path, args, trainer, plateau, progress):
        save_last(path, args, trainer, plateau, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_last_checkpoint", save_then_interrupt)
    with pytest.raises(SystemExit) as interrupted:
        model.main(tiny_args(prepared, tmp_path / "resumed", *run, "--workers", 0))
    assert interrupted.value.code == 130
    monkeypatch.setattr(model, "save_last_checkpoint", save_last)
    model.main(["--resume", "--out", str(tmp_path / "resumed"), "--workers", "1"])

    whole, resumed = (
        json.loads((tmp_path / run / model.HISTORY_FILE).read_text()) for run in ("whole", "resumed")
    )
    for history in (whole, resumed):
        del history["settings"]["out"]
        for epoch in history["epochs"]:
            del epoch["seconds"], epoch["train_seconds"]
    assert resumed == whole
    assert [epoch["image_size"] for epoch in whole["epochs"]] == [32, TINY_IMAGE_SIZE]
    for checkpoint, part in ((model.BEST_CHECKPOINT, "model_state"), (model.LAST_CHECKPOINT, "ema")):
        whole, resumed = (torch.load(tmp_path / run / checkpoint)[part] for run in ("whole", "resumed"))
        for name, tensor in whole.items():
            assert torch.equal(tensor, resumed[name]), name


def test_the_fused_optimiser_resumes_the_state_of_the_unfused_one_and_steps_alike():
    """Checkpoints written before model.py fused AdamW still resume, to the same next step."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    gradients = [[torch.randn_like(weight) for weight in weights] for _ in range(3)]

    def step(parameters, optimizer, gradient):
        for parameter, grad in zip(parameters, gradient, strict=True):
            parameter.grad = grad.clone()
        optimizer.step()

    def unfused(parameters):
        return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.05)

    expected = [torch.nn.Parameter(weight.clone()) for weight in weights]
    optimizer = unfused(expected)
    for gradient in gradients:
        step(expected, optimizer, gradient)

    resumed = [torch.nn.Parameter(weight.clone()) for weight in weights]
    earlier = unfused(resumed)
    for gradient in gradients[:2]:
        step(resumed, earlier, gradient)
    fused = training.make_optimizer(resumed, torch.device("cpu"), 1e-2, 0.05)
    assert fused.defaults["fused"]
    fused.load_state_dict(earlier.state_dict())
    step(resumed, fused, gradients[2])
    for got, want in zip(resumed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_backbone_learns_at_its_share_of_the_heads_rate_through_the_schedule():
    """--backbone-lr-scale 0.1: AdamW's first step moves each weight by about its group's rate (the
    update is lr * g / |g|), so head weights move by --lr and backbone weights by a tenth of it; the
    warm-up and cosine scale both groups alike. Scale 1 keeps one group, as runs before it had."""
    torch.manual_seed(0)
    network = backbones.SkinLesionModel("efficientnet_lite0")
    groups = training.parameter_groups(network, 1e-3, 0.1)
    head = set(map(id, network.efficientnet.classifier.parameters()))
    assert set(map(id, groups[0]["params"])) == head
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(network.parameters()))
    assert len(training.parameter_groups(network, 1e-3, 1.0)) == 1

    optimizer = training.make_optimizer(groups, torch.device("cpu"), 1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, training.warmup_cosine(1, 4))
    before = [parameter.detach().clone() for parameter in network.parameters()]
    network(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    moved = {
        id(parameter): (parameter.detach() - old).abs().max().item()
        for parameter, old in zip(network.parameters(), before, strict=True)
    }
    assert max(moved[key] for key in head) == pytest.approx(1e-3, rel=1e-3)
    assert max(moved[key] for key in moved if key not in head) == pytest.approx(1e-4, rel=1e-3)
    schedule.step()
    schedule.step()
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates[0] < 1e-3 and rates[1] == pytest.approx(rates[0] / 10)


def test_the_moving_average_follows_every_optimiser_step():
    """decay d: the first step's weights, then ema = d * ema + (1 - d) * weights after each step."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    args = SimpleNamespace(ema_decay=0.75)
    trainer = training.Trainer(
        network,
        torch.optim.SGD(network.parameters(), lr=0.5),
        torch.device("cpu"),
        ema=training.weight_average(args, network),
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(6, 3, 2, 2), torch.tensor([0, 1] * 3)), batch_size=2
    )
    expected, weights = None, []
    original_step = trainer.step

    def step_and_remember():
        original_step()
        weights.append(network[1].weight.detach().clone())

    trainer.step = step_and_remember
    trainer.train_one_epoch(loader, show_progress=False)
    for value in weights:
        expected = value if expected is None else 0.75 * expected + 0.25 * value
    assert len(weights) == 3
    torch.testing.assert_close(trainer.ema.module[1].weight, expected)
    assert training.weight_average(SimpleNamespace(ema_decay=0.0), network) is None


def test_diagnosis_class_weights_keep_melanoma_against_the_rest_balanced():
    labels = [1] * 10 + [0] * 30
    head = training_data.Head(diagnoses=["bcc", "mel", "nv"])
    weights = training.class_weights(labels, "balanced", torch.device("cpu"), head)
    two_class = training.class_weights(labels, "balanced", torch.device("cpu"), training_data.Head())
    assert weights.tolist() == [two_class[0].item(), two_class[1].item(), two_class[0].item()]
    assert two_class[1] * 10 == pytest.approx(two_class[0] * 30)  # melanoma weighs as much as the rest


def test_a_tree_without_diagnoses_falls_back_to_melanoma_with_a_notice(tmp_path, capsys):
    data = tmp_path / "data"
    for split, count in (("train", 3), ("val", 2)):
        make_prepared_folder(data / split, count=count)
    model.main(tiny_args(data, tmp_path / "out", "--epochs", 1, "--workers", 0, "--targets", "diagnosis"))
    printed = capsys.readouterr().out
    assert "there is no" in printed and "training melanoma against the rest" in printed
    saved = torch.load(tmp_path / "out" / model.BEST_CHECKPOINT, weights_only=True)
    assert (saved["targets"], saved["diagnoses"]) == ("melanoma", None)
    assert "ema_val_auc" not in json.loads((tmp_path / "out" / model.HISTORY_FILE).read_text())["epochs"][0]


def test_time_budget_ends_training_cleanly_and_still_tests(prepared, tmp_path, capsys):
    model.main(tiny_args(prepared, tmp_path, "--epochs", 3, "--workers", 0, "--time-budget", 0.0001))
    printed = capsys.readouterr().out
    assert "Time budget: epoch 2 would end after" in printed and "ends after epoch 1 of 3" in printed
    assert "ROC AUC:" in printed  # test/ is still scored
    history = json.loads((tmp_path / model.HISTORY_FILE).read_text())
    assert len(history["epochs"]) == 1 and history["stopped_by_time_budget"] is True


def test_the_time_budget_scales_only_the_training_part_with_the_next_size():
    """Epoch 1 took 100 s at 96 px, 80 of them training; epoch 2 trains at 160 px and validates at
    160 px as before: 80 * (160 / 96)^2 + 20 = 242 s more, so 342 s in all."""
    history = {"epochs": [{"seconds": 100.0, "train_seconds": 80.0, "image_size": 96}]}
    args = SimpleNamespace(image_size=160, progressive_from=96, epochs=2)
    assert not model.next_epoch_overruns(SimpleNamespace(**vars(args), time_budget=345 / 60), history)
    assert model.next_epoch_overruns(SimpleNamespace(**vars(args), time_budget=340 / 60), history)
    # A history from before train_seconds was recorded: the whole epoch scales (378 s in all).
    del history["epochs"][0]["train_seconds"]
    assert model.next_epoch_overruns(SimpleNamespace(**vars(args), time_budget=370 / 60), history)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_a_loadable_checkpoint(prepared, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "model.py"),
        *tiny_args(prepared, tmp_path, "--epochs", 1, "--workers", 0),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Epoch [1/1]") == 1  # only rank 0 prints
    assert "2 process(es)" in result.stdout
    loaded, meta = checkpoints.load_checkpoint(tmp_path / model.BEST_CHECKPOINT)
    history = json.loads((tmp_path / model.HISTORY_FILE).read_text())
    assert meta["epoch"] == 1 and history["epochs"][0]["epoch"] == 1


# --- bad input ----------------------------------------------------------------------------------


def run_main(argv, capsys):
    """model.main in this process (no interpreter start-up), as a CompletedProcess-like result."""
    with pytest.raises(SystemExit) as exit_info:
        model.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=captured.out, stderr=captured.err)


def test_a_bad_flag_is_one_line_on_the_command_line(prepared, tmp_path):
    result = run_script("model.py", *tiny_args(prepared, tmp_path), "--batch-size", "0")
    assert_one_line_error(result)
    assert "--batch-size" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "high"], "--threshold"),
        (["--target-sensitivity", "0"], "--target-sensitivity"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--amp", "fp16", "--device", "cpu"], "fp16"),
        (["--device", "cuda"], "CUDA"),
        (["--weights", "missing.pth"], "missing.pth"),
        (["--resume"], "nothing to resume"),
        (["--ema-decay", "1"], "--ema-decay"),
        (["--progressive-from", TINY_IMAGE_SIZE + 16], "--progressive-from"),
        (["--targets", "lesions"], "--targets"),
    ],
)
def test_bad_flags_are_one_line_errors(prepared, tmp_path, capsys, extra, message):
    result = run_main([*tiny_args(prepared, tmp_path, "--epochs", 1, "--workers", 0), *extra], capsys)
    assert_one_line_error(result)
    assert message in result.stderr


@pytest.mark.parametrize("layout", ["missing", "empty", "no val", "one class"])
def test_missing_or_unusable_data_is_a_one_line_error(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout != "missing":
        (data / "train").mkdir(parents=True)
    if layout in ("no val", "one class"):
        make_prepared_folder(data / "train", count=2, labels=(1,) if layout == "one class" else (0, 1))
    if layout == "one class":
        make_prepared_folder(data / "val", count=2)
    result = run_main(tiny_args(data, tmp_path / "out", "--epochs", 1, "--workers", 0), capsys)
    assert_one_line_error(result)
    assert not (tmp_path / "out" / model.BEST_CHECKPOINT).exists()
