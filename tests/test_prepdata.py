"""prepdata.py: labels, the lesion-grouped split, balancing, the written tree and its safety."""

import contextlib
import csv
import hashlib
import io
import shutil

import numpy as np
import pytest
from conftest import (
    HAM_SAMPLE,
    LARGE_PHOTOS,
    SAMPLE,
    SHARED_DATA,
    assert_one_line_error,
    run_script,
    sample_diagnoses,
    sample_labels,
)
from PIL import Image

import lesion_labels
import prepared
import prepdata
import subgroups

HAM_300 = SHARED_DATA / "ham10000_300"
SMALL = 64  # --max-side for tests: real images, tiny files


def prepare(out, *extra, csv_path=SAMPLE / "GroundTruth.csv", images=SAMPLE / "images", workers=1):
    """Run prepdata in this process; returns what it printed."""
    argv = ["--csv", csv_path, "--images", images, "--out", out, "--workers", workers, "--max-side", SMALL]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        prepdata.main([str(arg) for arg in [*argv, *extra]])
    return printed.getvalue()


def refusal(capsys, out, *extra, **inputs):
    """Run prepdata expecting a user error: exit 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        prepare(out, *extra, **inputs)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1, errors
    return errors[0]


def read_manifest(out):
    with open(out / "manifest.csv", newline="") as file:
        return list(csv.DictReader(file))


def originals(rows, split=None):
    return [row for row in rows if row["augmented"] == "no" and split in (None, row["split"])]


def tree_bytes(folder):
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def folder_digest(folder):
    return {name: hashlib.sha256(data).hexdigest() for name, data in tree_bytes(folder).items()}


def hidden_siblings(out):
    return [path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}.")]


def has_dark_corner(image, threshold=30, share=0.1):
    """Whether any corner patch (10% of each side) is nearly black, as vignetting or a black fill makes it."""
    grey = np.asarray(image.convert("L"), dtype=float)
    h, w = max(1, int(grey.shape[0] * share)), max(1, int(grey.shape[1] * share))
    corners = (grey[:h, :w], grey[:h, -w:], grey[-h:, :w], grey[-h:, -w:])
    return min(corner.mean() for corner in corners) < threshold


def dark_corner_share(paths, change=lambda image: image):
    return float(np.mean([has_dark_corner(change(Image.open(path))) for path in paths]))


@pytest.fixture(scope="module")
def sample_tree(tmp_path_factory):
    """The bundled sample, prepared with two workers; plus what was printed and the source digests."""
    out = tmp_path_factory.mktemp("sample") / "prepared"
    before = folder_digest(SAMPLE)
    printed = prepare(out, workers=2)
    return out, printed, before


@pytest.fixture(scope="module")
def ham_tree(tmp_path_factory):
    """210 real 600x450 HAM10000 images with the official metadata (found beside the CSV)."""
    out = tmp_path_factory.mktemp("ham") / "prepared"
    printed = prepare(out, csv_path=HAM_SAMPLE / "GroundTruth.csv", images=HAM_SAMPLE / "images", workers=2)
    return out, printed


# --- the tree ----------------------------------------------------------------------------------


def test_tree_matches_its_manifest(sample_tree):
    out, _, _ = sample_tree
    with open(out / "manifest.csv", newline="") as file:
        assert file.readline().strip() == ",".join(prepared.MANIFEST_COLUMNS)
    rows = read_manifest(out)
    on_disk = {f"{path.parent.name}/{path.name}" for path in out.glob("*/*")}
    assert on_disk == {f"{row['split']}/{row['file']}" for row in rows}
    assert sorted(path.name for path in out.iterdir()) == ["manifest.csv", "test", "train", "val"]
    labels = sample_labels()
    for row in rows:
        assert prepared.label_from_filename(row["file"]) == int(row["label"]) == labels[row["source_image"]]
        assert prepared.is_augmented_filename(row["file"]) == (row["augmented"] == "yes")
        assert row["lesion_id"].startswith("HAM_")
    assert {row["source_image"] for row in originals(rows)} == set(labels)


def test_only_train_is_augmented_and_it_is_balanced(sample_tree):
    rows = read_manifest(sample_tree[0])
    assert all(row["augmented"] == "no" for row in rows if row["split"] != "train")
    train = [row for row in rows if row["split"] == "train"]
    melanoma = sum(row["label"] == "1" for row in train)
    assert any(row["augmented"] == "yes" for row in train)
    assert melanoma == len(train) - melanoma
    assert all(row["label"] == "1" for row in train if row["augmented"] == "yes")


def test_source_folder_is_byte_identical_after_a_run(sample_tree):
    assert folder_digest(SAMPLE) == sample_tree[2]


def test_summary_table_counts_each_split(sample_tree):
    out, printed, _ = sample_tree
    rows = read_manifest(out)
    for split in prepared.SPLITS:
        in_split = [row for row in rows if row["split"] == split]
        melanoma = sum(row["label"] == "1" for row in in_split)
        lesions = len({row["lesion_id"] for row in originals(in_split)})
        augmented = len(in_split) - len(originals(in_split))
        expected = [split, len(in_split), lesions, melanoma, len(in_split) - melanoma, augmented]
        assert " ".join(map(str, expected)) in [" ".join(line.split()) for line in printed.splitlines()]


# --- the split ---------------------------------------------------------------------------------


def test_split_sizes_and_stratification(ham_tree):
    rows = originals(read_manifest(ham_tree[0]))
    melanoma_share = np.mean([row["label"] == "1" for row in rows])
    for split, fraction in zip(prepared.SPLITS, (0.7, 0.2, 0.1), strict=True):
        in_split = originals(rows, split)
        assert len(in_split) == pytest.approx(fraction * len(rows), abs=0.03 * len(rows))
        assert np.mean([row["label"] == "1" for row in in_split]) == pytest.approx(melanoma_share, abs=0.05)


def test_no_lesion_appears_in_two_splits(ham_tree):
    out, printed = ham_tree
    assert "Lesion ids from" in printed and "HAM10000_metadata.csv" in printed
    rows = read_manifest(out)
    assert all(row["lesion_id"] for row in rows)
    images_per_lesion = {}
    for row in originals(rows):
        images_per_lesion.setdefault(row["lesion_id"], set()).add(row["split"])
    assert sum(len(splits) for splits in images_per_lesion.values()) == len(images_per_lesion)
    # The sample does hold lesions photographed several times, so a leak was possible.
    assert len(originals(rows)) - len(images_per_lesion) >= 5


def ham_300_records(with_lesions):
    """Records of the 8,023 labelled images of ham10000_300, from its real CSV and metadata."""
    with open(HAM_300 / "HAM10000_metadata.csv", newline="") as file:
        lesions = {row["image_id"]: row["lesion_id"] for row in csv.DictReader(file)}
    with open(HAM_300 / "GroundTruth.csv", newline="") as file:
        labels = {row["image"]: int(float(row["MEL"])) for row in csv.DictReader(file)}
    return [
        prepdata.Record(image_id, label, lesions[image_id] if with_lesions else None)
        for image_id, label in labels.items()
    ]


def splits_per_lesion(splits, lesions):
    found = {}
    for name, records in splits.items():
        for record in records:
            found.setdefault(lesions[record.image_id], set()).add(name)
    return found


def test_full_scale_split_keeps_lesions_together_and_is_stratified():
    records = ham_300_records(with_lesions=True)
    lesions = {record.image_id: record.lesion_id for record in records}
    splits = prepdata.split_records(records, (0.7, 0.2, 0.1), seed=42)
    assert all(len(found) == 1 for found in splits_per_lesion(splits, lesions).values())
    melanoma_share = np.mean([record.label for record in records])
    for (name, members), fraction in zip(splits.items(), (0.7, 0.2, 0.1), strict=True):
        assert len(members) == pytest.approx(fraction * len(records), abs=0.01 * len(records)), name
        assert np.mean([record.label for record in members]) == pytest.approx(melanoma_share, abs=0.01)
    # Without lesion ids the very same split would leak many lesions: the check above can fail.
    ungrouped = prepdata.split_records(ham_300_records(with_lesions=False), (0.7, 0.2, 0.1), seed=42)
    assert sum(len(found) > 1 for found in splits_per_lesion(ungrouped, lesions).values()) > 100


def test_same_seed_gives_identical_bytes_with_any_worker_count(sample_tree, tmp_path):
    single_process = tmp_path / "single"
    prepare(single_process, workers=1)
    assert tree_bytes(single_process) == tree_bytes(sample_tree[0])


def test_another_seed_gives_another_split_and_other_copies(sample_tree, tmp_path):
    other = tmp_path / "other"
    prepare(other, "--seed", "7")
    assert {row["file"] for row in originals(read_manifest(other), "test")} != {
        row["file"] for row in originals(read_manifest(sample_tree[0]), "test")
    }
    ours, theirs = tree_bytes(sample_tree[0]), tree_bytes(other)
    shared_copies = [name for name in ours.keys() & theirs.keys() if "_aug_" in name]
    assert shared_copies and any(ours[name] != theirs[name] for name in shared_copies)


def test_zero_fractions_put_everything_in_test_and_small_jpegs_are_copied(tmp_path):
    out = tmp_path / "prepared"
    prepare(out, "--split", "0", "0", "1", "--max-side", "512")
    rows = read_manifest(out)
    assert {row["split"] for row in rows} == {"test"} and len(rows) == len(sample_labels())
    assert not any((out / "train").iterdir()) and not any((out / "val").iterdir())
    # 300x225 JPEGs fit within 512 pixels: stored as they are, no re-encoding.
    row = rows[0]
    assert (out / "test" / row["file"]).read_bytes() == (
        SAMPLE / "images" / f"{row['source_image']}.jpg"
    ).read_bytes()


# --- balancing and augmentation ------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "ratio"), [(["--no-balance"], None), (["--balance-ratio", "0.8"], 0.8)])
def test_balance_flags(tmp_path, flags, ratio):
    out = tmp_path / "prepared"
    prepare(out, *flags)
    train = [row for row in read_manifest(out) if row["split"] == "train"]
    melanoma = sum(row["label"] == "1" for row in train)
    if ratio is None:
        assert all(row["augmented"] == "no" for row in train)
    else:
        assert melanoma == round(ratio * (len(train) - melanoma))


def test_augmented_copies_have_the_dark_corner_share_of_real_training_images(ham_tree):
    out, _ = ham_tree
    train = [row for row in read_manifest(out) if row["split"] == "train"]
    augmented = [out / "train" / row["file"] for row in train if row["augmented"] == "yes"]
    real = [out / "train" / row["file"] for row in originals(train)]
    assert len(augmented) >= 40
    assert dark_corner_share(augmented) == pytest.approx(dark_corner_share(real), abs=0.1)


def test_dark_corner_measure_catches_black_filled_rotations(ham_tree):
    """The check above can fail: the original's black-filled rotations would not pass it."""
    out, _ = ham_tree
    real = [out / "train" / row["file"] for row in originals(read_manifest(out), "train")]
    black_filled = dark_corner_share(real, lambda image: image.rotate(30, fillcolor=(0, 0, 0)))
    assert black_filled > dark_corner_share(real) + 0.5


def test_large_photos_are_shrunk_and_missing_lesion_ids_are_said(tmp_path):
    out = tmp_path / "prepared"
    printed = prepare(out, csv_path=LARGE_PHOTOS / "GroundTruth.csv", images=LARGE_PHOTOS / "images")
    assert "No lesion ids" in printed
    rows = read_manifest(out)
    assert len(originals(rows)) == 8 and all(row["lesion_id"] == "" for row in rows)
    for row in rows:
        assert max(Image.open(out / row["split"] / row["file"]).size) <= SMALL
    assert any(line.split()[:1] == ["train"] and line.split()[2] == "-" for line in printed.splitlines())


# --- input formats -------------------------------------------------------------------------------


def sample_rows():
    with open(SAMPLE / "GroundTruth.csv", newline="") as file:
        return list(csv.reader(file))


def labels_written(out):
    return {row["source_image"]: int(row["label"]) for row in originals(read_manifest(out))}


def test_bom_crlf_blank_lines_spaces_and_file_suffixes_are_tolerated(tmp_path):
    header, *rows = sample_rows()
    lines = [" , ".join(header)] + [f" {row[0]}.jpg , {' , '.join(row[1:])} " for row in rows]
    text = "\r\n\r\n".join(lines) + "\r\n\r\n"
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    out = tmp_path / "prepared"
    prepare(out, "--csv", tmp_path / "labels.csv", "--metadata", SAMPLE / "HAM10000_metadata.csv")
    assert labels_written(out) == sample_labels()


def test_isic_2019_ground_truth_with_integer_labels(tmp_path):
    header, *rows = sample_rows()
    with open(tmp_path / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*header, "SCC", "UNK"])
        writer.writerows([[row[0], *(str(int(float(value))) for value in row[1:]), "0", "0"] for row in rows])
    out = tmp_path / "prepared"
    printed = prepare(out, csv_path=tmp_path / "ISIC_2019_Training_GroundTruth.csv", workers=2)
    assert labels_written(out) == sample_labels()
    assert "No lesion ids" in printed
    assert {(row["age"], row["sex"], row["localization"]) for row in read_manifest(out)} == {("", "", "")}


def test_metadata_csv_gives_labels_from_dx_and_lesion_ids(tmp_path):
    out = tmp_path / "prepared"
    prepare(out, csv_path=SAMPLE / "HAM10000_metadata.csv")
    assert labels_written(out) == sample_labels()
    assert all(row["lesion_id"] for row in read_manifest(out))


def diagnoses_written(out):
    return {row["source_image"]: row["diagnosis"] for row in read_manifest(out)}


def test_every_image_keeps_its_diagnosis_from_one_hot_columns_or_dx(sample_tree, tmp_path):
    expected = sample_diagnoses()
    assert len(set(expected.values())) > 2  # the sample holds several diagnoses
    assert diagnoses_written(sample_tree[0]) == expected  # GroundTruth.csv's one-hot columns
    out = tmp_path / "from_dx"
    prepare(out, csv_path=SAMPLE / "HAM10000_metadata.csv")
    assert diagnoses_written(out) == expected
    assert "Diagnoses of train/ (original images): " in sample_tree[1]


def test_diagnoses_come_from_the_metadata_when_the_labels_have_only_mel(tmp_path):
    header, *rows = sample_rows()
    with open(tmp_path / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([header[:2], *(row[:2] for row in rows)])
    out = tmp_path / "prepared"
    prepare(out, "--metadata", SAMPLE / "HAM10000_metadata.csv", csv_path=tmp_path / "labels.csv")
    assert diagnoses_written(out) == sample_diagnoses()


def test_without_any_diagnosis_source_every_diagnosis_is_unknown_but_melanoma(tmp_path):
    header, *rows = sample_rows()
    with open(tmp_path / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([header[:2], *(row[:2] for row in rows)])
    out = tmp_path / "prepared"
    prepare(out, csv_path=tmp_path / "labels.csv")
    written = read_manifest(out)
    assert {row["diagnosis"] for row in written if row["label"] == "1"} == {"mel"}
    assert {row["diagnosis"] for row in written if row["label"] == "0"} == {"unknown"}


def test_isic_2019_unk_and_rows_marking_no_diagnosis_are_unknown(tmp_path):
    header, *rows = sample_rows()
    nevus = next(row for row in rows if row[header.index("NV")] == "1.0")
    nevus[header.index("NV")] = "0.0"
    with open(tmp_path / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([[*header, "UNK"], *([*row, "0.0"] for row in rows)])
    out = tmp_path / "prepared"
    prepare(out, "--metadata", SAMPLE / "HAM10000_metadata.csv", csv_path=tmp_path / "labels.csv")
    written = diagnoses_written(out)
    assert written[nevus[0]] == "unknown"
    assert sum(value == "unknown" for value in written.values()) == 1


def test_a_manifest_without_diagnoses_reads_as_unknown(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "split,file,label,source_image,lesion_id,augmented\ntrain,nomel_a.jpg,0,a,,no\n"
    )
    (row,) = prepared.read_manifest(tmp_path / "manifest.csv")
    assert row.diagnosis == lesion_labels.UNKNOWN_DIAGNOSIS
    assert (row.age, row.sex, row.localization) == ("", "", "")


def sample_facts():
    """{image_id: (age, sex, localization)} as the bundled sample's HAM10000 metadata writes them."""
    with open(SAMPLE / "HAM10000_metadata.csv", newline="") as file:
        return {
            row["image_id"]: (row["age"], row["sex"], row["localization"]) for row in csv.DictReader(file)
        }


def facts_written(out):
    return {row["source_image"]: (row["age"], row["sex"], row["localization"]) for row in read_manifest(out)}


def test_age_sex_and_body_site_come_from_the_metadata_beside_the_labels_or_as_labels(sample_tree, tmp_path):
    expected = {
        image_id: (f"{float(age):g}", sex, "" if site == "unknown" else site)
        for image_id, (age, sex, site) in sample_facts().items()
    }
    assert len({site for _, _, site in expected.values()}) > 5 and "" in {
        site for *_, site in expected.values()
    }
    assert facts_written(sample_tree[0]) == expected  # GroundTruth.csv, metadata found beside it
    assert "Age, sex and body site from" in sample_tree[1]
    out = tmp_path / "from_metadata"
    prepare(out, csv_path=SAMPLE / "HAM10000_metadata.csv")
    assert facts_written(out) == expected
    augmented = [row for row in read_manifest(out) if row["augmented"] == "yes"]
    assert augmented and all(row["sex"] for row in augmented), "a copy keeps its image's facts"
    manifest_rows = prepared.read_manifest(out / "manifest.csv")
    assert {row.source_image: (row.age, row.sex, row.localization) for row in manifest_rows} == expected


def test_isic_2019_metadata_columns_give_the_same_facts():
    row = {"image": "ISIC_1", "age_approx": "55.0", "anatom_site_general": "Palms/Soles", "sex": "female"}
    assert subgroups.recorded_facts(row) == {"age": "55", "sex": "female", "localization": "palms/soles"}
    unknown = {"age": "", "sex": "unknown", "localization": "unknown"}
    assert subgroups.recorded_facts(unknown) == {"age": "", "sex": "", "localization": ""}


@pytest.mark.parametrize("age", ["forty", "-5", "nan", "200"])
def test_a_bad_age_in_the_metadata_is_one_line_and_exit_2(tmp_path, capsys, age):
    lines = (SAMPLE / "HAM10000_metadata.csv").read_text().splitlines()
    fields = lines[3].split(",")
    fields[4] = age
    lines[3] = ",".join(fields)
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    message = refusal(capsys, out, "--metadata", tmp_path / "metadata.csv")
    assert f"metadata.csv line 4: age '{age}' is not an age in years" in message
    assert not out.exists() and not hidden_siblings(out)


def test_missing_corrupt_and_truncated_images_are_skipped_and_reported(tmp_path, writable_copy):
    images = writable_copy(SAMPLE / "images")
    missing, corrupt, truncated = sorted(sample_labels())[:3]
    (images / f"{missing}.jpg").unlink()
    (images / f"{corrupt}.jpg").write_bytes(b"this is not a JPEG" * 100)
    data = (images / f"{truncated}.jpg").read_bytes()
    (images / f"{truncated}.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "prepared"
    printed = prepare(out, images=images, workers=2)
    assert "Missing images: 1 " in printed and missing in printed
    assert "Unreadable images: 2 skipped" in printed
    assert corrupt in printed and truncated in printed
    written = labels_written(out)
    assert len(written) == len(sample_labels()) - 3
    assert not {missing, corrupt, truncated} & written.keys()


def test_duplicate_ids_are_reported_once_and_conflicts_dropped(tmp_path):
    header, *rows = sample_rows()
    repeated, conflicting = rows[0], rows[1]
    flipped = [conflicting[0], "0.0" if float(conflicting[1]) else "1.0", *conflicting[2:]]
    with open(tmp_path / "GroundTruth.csv", "w", newline="") as file:
        csv.writer(file).writerows([header, *rows, repeated, repeated, flipped])
    out = tmp_path / "prepared"
    printed = prepare(
        out, "--metadata", SAMPLE / "HAM10000_metadata.csv", csv_path=tmp_path / "GroundTruth.csv"
    )
    duplicate_lines = [line for line in printed.splitlines() if line.startswith("Duplicate ids")]
    assert len(duplicate_lines) == 1 and duplicate_lines[0].startswith("Duplicate ids: 2 ")
    assert "Conflicting labels: 1 " in printed and conflicting[0] in printed
    written = labels_written(out)
    assert repeated[0] in written and conflicting[0] not in written


# --- refusals: one line, exit 2, nothing written ---------------------------------------------------


MALFORMED_CSVS = {
    "empty": b"",
    "blank lines only": b"\r\n \r\n",
    "header only": b"image,MEL,NV\n",
    "no label column": b"image,NV,BCC\nISIC_0024306,1.0,0.0\n",
    "MEL not 0 or 1": b"image,MEL\nISIC_0024306,yes\n",
    "no image id": b"image,MEL\n,1.0\n",
    "not text": bytes(range(256)) * 4,
    "no image on disk": b"image,MEL\nISIC_9999999,1.0\n",
}


@pytest.mark.parametrize("content", MALFORMED_CSVS.values(), ids=MALFORMED_CSVS.keys())
def test_malformed_csv_is_one_line_and_exit_2(tmp_path, capsys, content):
    (tmp_path / "GroundTruth.csv").write_bytes(content)
    out = tmp_path / "prepared"
    assert "GroundTruth.csv" in refusal(capsys, out, csv_path=tmp_path / "GroundTruth.csv")
    assert not out.exists() and not hidden_siblings(out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--csv", "nowhere.csv"], "label CSV not found"),
        (["--images", "no_such_folder"], "images folder not found"),
        (["--metadata", "nowhere.csv"], "metadata CSV not found"),
        (["--split", "0.5", "0.5", "0.5"], "summing to 1"),
        (["--split", "-0.1", "0.6", "0.5"], "summing to 1"),
        (["--balance-ratio", "0"], "--balance-ratio"),
        (["--max-side", "-1"], "--max-side"),
        (["--seed", "-1"], "--seed"),
        (["--workers", "0"], "--workers"),
        (["--no-balance", "--balance-ratio", "2"], "not allowed with"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    assert message in refusal(capsys, tmp_path / "prepared", *flags)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("inside", [False, True])
def test_output_overlapping_the_images_is_refused(writable_copy, capsys, inside):
    images = writable_copy(SAMPLE / "images")
    before = folder_digest(images)
    out = images / "prepared" if inside else images
    assert "overlaps the input" in refusal(capsys, out, "--overwrite", images=images)
    assert folder_digest(images) == before


def test_malformed_csv_from_the_command_line(tmp_path):
    (tmp_path / "GroundTruth.csv").write_text("image,NV\nISIC_0024306,1.0\n")
    shutil.copytree(SAMPLE / "images", tmp_path / "images")
    result = run_script("prepdata.py", cwd=tmp_path)
    assert_one_line_error(result)
    assert "no label column" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["GroundTruth.csv", "images"]


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--overwrite" in refusal(capsys, out)
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and not hidden_siblings(out)
    prepare(out, "--overwrite")
    assert not (out / "notes.txt").exists() and (out / "manifest.csv").is_file()
    assert not hidden_siblings(out)


def test_symlinked_output_is_rebuilt_where_it_points(tmp_path):
    target = tmp_path / "disk" / "prepared"
    prepare(target, "--no-balance")
    link = tmp_path / "prepared"
    link.symlink_to(target, target_is_directory=True)
    prepare(link, "--overwrite")
    assert link.is_symlink() and link.resolve() == target
    assert any(row["augmented"] == "yes" for row in read_manifest(target))


def test_interrupted_run_leaves_the_previous_tree_and_no_partial_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "prepared"
    prepare(out)
    before = tree_bytes(out)

    def interrupted(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepdata, "augment_image", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        prepare(out, "--overwrite", "--seed", "1")
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert not hidden_siblings(out)
    shutil.rmtree(out)
    with pytest.raises(SystemExit):
        prepare(out)
    assert not out.exists() and not hidden_siblings(out)


def test_every_flag_has_help():
    parser = prepdata.get_args_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
