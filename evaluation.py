"""The test split's summary once training ends (model.py): the best checkpoint scored by the
serving engine, as analysis.py and the app score, and summed up by metrics.py. Torch-free."""

from pathlib import Path

from sklearn.metrics import classification_report

import engine
import lesion_labels
import metrics
import prepared
import scoring


def print_test_summary(true_labels, probabilities, threshold):
    """The test split's figures, from the same functions (metrics.py) as analysis.py's report."""
    result = metrics.evaluate(true_labels, probabilities, threshold)
    predicted = metrics.predict_labels(probabilities, threshold)
    print(f"Test Accuracy: {100 * result['accuracy']:.2f}% ({result['n_images']} images)")
    print("Classification Report:")
    print(
        classification_report(
            true_labels,
            predicted,
            labels=[0, 1],
            target_names=list(lesion_labels.CLASS_NAMES),
            zero_division=0,
        )
    )
    print(f"ROC AUC: {with_interval(result['roc_auc'], result['confidence_intervals_95']['roc_auc'])}")
    for name in ("sensitivity", "specificity"):
        shown = with_interval(result[name], result["wilson_intervals_95"][name])
        print(f"{name.capitalize()} at threshold {threshold:.4f}: {shown}")
    print(f"Expected calibration error: {result['expected_calibration_error']:.4f}")
    return result


def with_interval(value, interval):
    if value is None:
        return "n/a (needs images of both classes)"
    return f"{value:.4f}" + ("" if interval is None else f" (95% CI {interval[0]:.3f} to {interval[1]:.3f})")


def evaluate_best_on_test(args, device, best_path):
    """Score test/ with the best checkpoint through the serving engine (engine.load_network), as
    analysis.py and the app do."""
    test_folder = Path(args.data) / "test"
    samples = prepared.list_prepared_images(test_folder) if test_folder.is_dir() else []
    if not samples:
        print(f"Note: {args.data}/test has no images, so there is no test evaluation.")
        return None
    network = engine.load_network(best_path, str(device))
    meta = network.meta
    print(
        f"Testing {best_path} (epoch {meta['epoch']}; threshold {meta['threshold']:.4f}, "
        f"{meta['threshold_rule']}; {network.engine})."
    )
    paths, true_labels = zip(*samples, strict=True)
    test = engine.score_files(network, paths, true_labels, args.batch_size, args.workers, description="Test")
    rules = scoring.ScoringRules(meta)
    flagged = [not answer["reliable"] for answer in rules.answers(test.logits, test.stage_means, test.facts)]
    print(f"Flagged as not judgeable (out of distribution): {sum(flagged)} of {len(flagged)} test images.")
    return print_test_summary(test.labels, rules.probabilities(test.logits), meta["threshold"])
