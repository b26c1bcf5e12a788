"""The trust layer: calibration, the 'cannot judge this image' flag, quality warnings, and
checkpoints that have none of them."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import (
    HAM_SAMPLE,
    SAMPLE,
    make_random_checkpoint,
    make_trusted_checkpoint,
    run_script,
    text_page,
)
from PIL import Image, ImageFilter

import analysis
import backbones
import checkpoints
import engine
import heatmaps
import image_input
import scoring
import scoring_fit
import torch_reference

HELD_OUT_LESIONS = sorted(
    path for path in (HAM_SAMPLE / "images").glob("*.jpg") if not (SAMPLE / "images" / path.name).exists()
)[:40]


def foreign_images():
    """Pictures that are not dermoscopic images of a lesion: a flat colour, a text page, a gradient.

    Random weights make poor features: they cannot tell white paper or noise from skin, so these
    tests use pictures whose statistics are far from any photo's. How well a trained network's
    score separates real foreign pictures is measured by bench/bench_trust.py."""
    gradient = np.linspace(0, 255, 600, dtype=np.uint8)[None, :, None].repeat(450, 0).repeat(3, 2)
    return {
        "blue": Image.new("RGB", (600, 450), (30, 60, 200)),
        "text page": text_page(),
        "gradient": Image.fromarray(gradient),
    }


def answers_for(checkpoint, images):
    """What scoring.ScoringRules answers for PIL images, scored as the app scores an upload."""
    network, meta = checkpoints.load_scoring_model(checkpoint)
    transform = torch_reference.checkpoint_transform(meta)
    batch = torch.stack([transform(image) for image in images])
    logits, stage_means = backbones.network_outputs(network, batch, torch.device("cpu"))
    facts = [image_input.image_facts(image, meta["image_size"]) for image in images]
    return scoring.ScoringRules(meta).answers(logits, stage_means, facts)


def test_foreign_images_are_flagged_and_real_lesions_mostly_not(trusted_checkpoint):
    foreign = foreign_images()
    for name, answer in zip(foreign, answers_for(trusted_checkpoint, list(foreign.values())), strict=True):
        assert answer["reliable"] is False, name
        assert answer["reasons"] == [scoring.NOT_A_LESION]
        assert answer["ood_score"] > answer["ood_threshold"]
    lesions = [image_input.load_image(path) for path in HELD_OUT_LESIONS]
    flagged = [not answer["reliable"] for answer in answers_for(trusted_checkpoint, lesions)]
    # The threshold flags 5% of validation images; held-out lesions of the same kind may be
    # flagged somewhat more often by a random network, never many of them.
    assert np.mean(flagged) <= 0.15
    training = [
        image_input.load_image(path)
        for path in sorted((trusted_checkpoint.parent / "prepared" / "train").iterdir())
    ]
    flagged = [answer["reliable"] is False for answer in answers_for(trusted_checkpoint, training)]
    assert np.mean(flagged) <= 0.1  # about the 5% of validation images the threshold flags


def test_calibration_keeps_the_ranking_and_every_decision(trusted_checkpoint):
    meta = torch.load(trusted_checkpoint, weights_only=True)
    calibration = meta["calibration"]
    assert calibration["method"] == "platt" and calibration["slope"] > 0
    network, _ = checkpoints.load_scoring_model(trusted_checkpoint)
    scored = torch_reference.score_dataset(
        network,
        torch_reference.ScoringDataset(trusted_checkpoint.parent / "prepared" / "val", meta),
        torch.device("cpu"),
    )
    raw = scoring.melanoma_probability(scored.logits)
    shown = scoring.ScoringRules(meta).probabilities(scored.logits)
    assert not np.allclose(raw, shown), "a calibration that changes nothing tests nothing"
    # No pair changes order: along the network's log-odds, the shown probability never falls.
    # (Compared on log-odds: a raw probability can round to exactly 1.0 where the calibrated
    # one still tells two images apart.)
    along_log_odds = shown[np.argsort(scoring.melanoma_log_odds(scored.logits), kind="stable")]
    assert np.all(np.diff(along_log_odds) >= 0)
    np.testing.assert_array_equal(raw >= meta["threshold_uncalibrated"], shown >= meta["threshold"])
    assert (
        calibration["val_expected_calibration_error_after"]
        <= calibration["val_expected_calibration_error_before"]
    )


def test_the_shown_probability_is_made_in_one_place():
    logits = np.array([[0.3, -1.2], [2.0, 2.5], [-4.0, 3.0]])
    calibration = {"slope": 0.7, "intercept": -1.5}
    expected = 1 / (1 + np.exp(-(0.7 * (logits[:, 1] - logits[:, 0]) - 1.5)))
    np.testing.assert_allclose(scoring.melanoma_probability(logits, calibration), expected, rtol=1e-12)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scoring.melanoma_probability(logits), softmax[:, 1], rtol=1e-12)
    rules = scoring.ScoringRules({"image_size": 64, "threshold": 0.5, "calibration": calibration})
    np.testing.assert_array_equal(
        rules.probabilities(logits), scoring.melanoma_probability(logits, calibration)
    )


def test_a_diagnosis_head_gives_the_melanoma_softmax_probability_and_its_heat_map_outputs():
    meta = {"image_size": 64, "threshold": 0.5, "diagnoses": ["bcc", "mel", "nv", "vasc"]}
    logits = np.array([[0.3, -1.2, 2.0, 0.1], [-3.0, 4.0, 1.0, 0.5], [1.0, 0.0, -2.0, 2.5]])
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert scoring.melanoma_output(meta) == 1
    np.testing.assert_allclose(scoring.ScoringRules(meta).probabilities(logits), softmax[:, 1], rtol=1e-12)
    # melanoma explains a melanoma label; the most likely other diagnosis explains the rest
    assert heatmaps.heatmap_outputs(logits, [0, 1, 0], meta) == [2, 1, 3]
    assert heatmaps.heatmap_outputs(logits[:, :2], [0, 1, 1], {"image_size": 64}) == [0, 1, 1]
    diagnoses_last = {**meta, "diagnoses": ["bcc", "nv", "vasc", "mel"]}
    np.testing.assert_allclose(
        scoring.melanoma_probability(logits, melanoma_index=scoring.melanoma_output(diagnoses_last)),
        softmax[:, 3],
        rtol=1e-12,
    )


def test_the_rules_survive_a_weights_only_round_trip(trusted_checkpoint, tmp_path):
    saved = torch.load(trusted_checkpoint, weights_only=True)
    assert {"calibration", "ood", "quality", "threshold_uncalibrated"} <= set(saved)
    network, meta = checkpoints.load_checkpoint(trusted_checkpoint)
    checkpoints.save_checkpoint(tmp_path / "copy.pth", network, meta)
    foreign = list(foreign_images().values())
    assert answers_for(tmp_path / "copy.pth", foreign) == answers_for(trusted_checkpoint, foreign)


def test_quality_warnings_catch_blur_and_darkness_but_not_the_lesion_as_it_is(trusted_checkpoint):
    lesion = image_input.load_image(HELD_OUT_LESIONS[0])
    blurred = lesion.filter(ImageFilter.GaussianBlur(12))
    dark = Image.fromarray((np.asarray(lesion) * 0.15).astype(np.uint8))
    sharp, soft, night = answers_for(trusted_checkpoint, [lesion, blurred, dark])
    assert not any("blurred" in warning or "dark" in warning for warning in sharp["warnings"])
    assert any("blurred" in warning for warning in soft["warnings"])
    assert any("very dark" in warning for warning in night["warnings"])


def test_a_checkpoint_without_rules_answers_and_says_flagging_is_not_available(tmp_path):
    checkpoint = make_random_checkpoint(tmp_path / "old.pth")
    (answer,) = answers_for(checkpoint, [image_input.load_image(HELD_OUT_LESIONS[0])])
    assert answer["reliable"] is None and answer["ood_score"] is None
    assert "flagging is not available" in answer["reasons"][0]
    assert answer["calibrated"] is False
    assert 0 <= answer["probability"] <= 1


def test_too_few_validation_images_leave_the_probability_uncalibrated():
    calibration, why_not = scoring_fit.fit_calibration(
        np.array([1, 0, 0, 1, 0]), np.array([1.0, -1, -2, 0.5, 0])
    )
    assert calibration is None and "needs 10 of each" in why_not


@pytest.mark.parametrize("flag_rate", [0.05, 0.2])
def test_the_ood_threshold_flags_the_chosen_share_of_validation(flag_rate):
    rng = np.random.default_rng(0)

    def stage_means(count):  # stages 0 to 3, of 4 to 7 channels
        return [rng.normal(size=(count, 4 + stage)) for stage in range(4)]

    train = engine.ScoredImages(np.repeat([0, 1], 100), logits=None, stage_means=stage_means(200), facts=None)
    val = stage_means(400)
    ood = scoring_fit.fit_ood(train, val, flag_rate, stages=(1, 2, 3))
    rules = scoring.ScoringRules({"image_size": 64, "threshold": 0.5, "ood": ood})
    flagged = rules.ood_scores(val) > ood["threshold"]
    assert abs(flagged.mean() - flag_rate) <= 0.01
    assert [stage["stage"] for stage in ood["stages"]] == [1, 2, 3]


def test_fit_scoring_only_adds_the_rules_and_keeps_the_trained_threshold_rule(tmp_path):
    trusted = make_trusted_checkpoint(tmp_path)  # also lays out tmp_path/prepared
    network, meta = checkpoints.load_checkpoint(trusted)
    for key in ("calibration", "ood", "quality", "threshold_uncalibrated", "not_calibrated"):
        meta.pop(key)
    meta.update(
        threshold=0.5, settings={"threshold": 0.5, "target_sensitivity": 0.9}
    )  # like --preset original
    checkpoints.save_checkpoint(tmp_path / "best_model.pth", network, meta)

    result = run_script(
        "model.py", "--fit-scoring-only", "--data", tmp_path / "prepared", "--out", tmp_path, "--workers", 0
    )
    assert result.returncode == 0, result.stderr
    refitted = torch.load(tmp_path / "best_model.pth", weights_only=True)
    assert refitted["threshold_uncalibrated"] == 0.5 and "fixed at 0.5" in refitted["threshold_rule"]
    assert refitted["calibration"]["slope"] > 0 and refitted["ood"]["stages"] and refitted["quality"]
    assert "/test has no images" in result.stdout


def test_analysis_reports_calibration_flags_and_the_unflagged_metrics(trusted_checkpoint, tmp_path):
    val = trusted_checkpoint.parent / "prepared" / "val"
    with contextlib.redirect_stdout(io.StringIO()):
        analysis.main(["--model", str(trusted_checkpoint), "--data", str(val), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "metrics.json").read_text())
    calibration, flagging = result["calibration"], result["flagging"]
    assert calibration["calibrated"] is True
    assert (
        calibration["after"]["expected_calibration_error"]
        < calibration["before"]["expected_calibration_error"]
    )
    assert flagging["available"] is True and flagging["n_flagged"] == len(flagging["flagged_files"])
    with open(tmp_path / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows if row["flagged"] == "yes"] == flagging["flagged_files"]
    assert all(row["ood_score"] and row["probability_uncalibrated"] for row in rows)
    summary = (tmp_path / "summary_report.txt").read_text()
    assert "Calibration: Platt scaling" in summary
    assert f"Flagged as not judgeable: {flagging['n_flagged']} of {len(rows)} images" in summary
    if result["unflagged"] is not None:
        assert result["unflagged"]["n_images"] == len(rows) - flagging["n_flagged"]
        assert f"Metrics on the {result['unflagged']['n_images']} unflagged images:" in summary
