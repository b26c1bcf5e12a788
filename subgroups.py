"""Who an image comes from: the facts a metadata file records about it (age, sex, body site),
checked once for the manifest, and the subgroups analysis.py reports on (diagnosis, sex, age
band, body region). Torch-free: plain rows in, plain lists and dicts out.

A fact that is not recorded is '' in the manifest and the group "unknown" here.
"""

import math

UNKNOWN = "unknown"
FACTS = ("age", "sex", "localization")
# Column names of each fact: HAM10000's metadata first, then ISIC 2019's (age_approx,
# anatom_site_general) and ISIC 2020's (anatom_site_general_challenge).
FACT_COLUMNS = {
    "age": ("age", "age_approx"),
    "sex": ("sex",),
    "localization": ("localization", "anatom_site_general", "anatom_site_general_challenge"),
}
SEXES = ("female", "male")
# (upper bound, name): "under 30" holds ages below 30, and so on.
AGE_BANDS = ((30, "under 30"), (50, "30-49"), (70, "50-69"), (math.inf, "70 and over"))
# HAM10000's localization values, and ISIC 2019/2020's general sites, by region. Acral skin
# (palms, soles) is its own region: dermoscopy models are known to fail there.
REGIONS = {
    "head and neck": ("scalp", "face", "ear", "neck", "head/neck"),
    "trunk": (
        "trunk",
        "back",
        "chest",
        "abdomen",
        "torso",
        "anterior torso",
        "posterior torso",
        "lateral torso",
    ),
    "upper extremity": ("upper extremity",),
    "lower extremity": ("lower extremity",),
    "acral (hand, foot)": ("hand", "foot", "acral", "palms/soles"),
    "genital or oral": ("genital", "oral/genital"),
}
REGION_OF = {site: region for region, sites in REGIONS.items() for site in sites}
OTHER_REGION = "other"
DIAGNOSIS_NAMES = {
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
    "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / Bowen's",
    "ak": "actinic keratosis",
    "scc": "squamous cell carcinoma",
}
DIMENSIONS = ("diagnosis", "sex", "age", "body_site")
DIMENSION_NAMES = {"diagnosis": "diagnosis", "sex": "sex", "age": "age band", "body_site": "body site"}


# --- facts from a metadata file (prepdata.py) ---------------------------------------------------


def has_facts(columns):
    """Whether a CSV with these (lower-case) column names records any of the facts."""
    return any(column in columns for names in FACT_COLUMNS.values() for column in names)


def recorded_facts(row):
    """{age, sex, localization} of one metadata row (lower-case column names): the age as a
    plain number ('45', '42.5'), sex and site in lower case, '' where unknown. A value that is
    not an age raises ValueError with the reason."""
    values = {fact: first_value(row, FACT_COLUMNS[fact]).lower() for fact in FACTS}
    values = {fact: "" if value == UNKNOWN else value for fact, value in values.items()}
    if values["age"]:
        values["age"] = f"{parsed_age(values['age']):g}"
    return values


def first_value(row, columns):
    return next((row[column].strip() for column in columns if row.get(column, "").strip()), "")


def parsed_age(text):
    try:
        age = float(text)
    except ValueError:
        age = math.nan
    if not 0 <= age < 150:  # also refuses nan and inf
        raise ValueError(f"age {text!r} is not an age in years")
    return age


# --- the groups (analysis.py) -------------------------------------------------------------------


def age_band(age):
    """The band of an age recorded as text ('' or 'unknown' is unknown)."""
    if not age or age == UNKNOWN:
        return UNKNOWN
    years = parsed_age(age)
    return next(name for upper, name in AGE_BANDS if years < upper)


def body_region(localization):
    if not localization or localization.lower() == UNKNOWN:
        return UNKNOWN
    return REGION_OF.get(localization.lower(), OTHER_REGION)


def sex_group(sex):
    return sex.lower() if sex and sex.lower() in SEXES else UNKNOWN


def diagnosis_group(diagnosis):
    return diagnosis.lower() if diagnosis else UNKNOWN


GROUP_OF = {"diagnosis": diagnosis_group, "sex": sex_group, "age": age_band, "body_site": body_region}
FACT_OF = {"diagnosis": "diagnosis", "sex": "sex", "age": "age", "body_site": "localization"}


def group_members(rows):
    """{dimension: {group: [indices of the rows in it]}} for the rows of the scored images, in
    their order (a row is a mapping holding diagnosis, age, sex and localization; None for an
    image nothing is known about). A dimension no row records is left out. Groups come in a
    fixed order (bands by age, regions as listed), "unknown" last. A bad age raises ValueError."""
    members = {}
    for dimension in DIMENSIONS:
        groups = {}
        for index, row in enumerate(rows):
            value = (row or {}).get(FACT_OF[dimension]) or ""
            groups.setdefault(GROUP_OF[dimension](value), []).append(index)
        if set(groups) - {UNKNOWN}:
            members[dimension] = {name: groups[name] for name in sorted(groups, key=group_order(dimension))}
    return members


def group_order(dimension):
    fixed = {
        "age": [name for _, name in AGE_BANDS],
        "body_site": [*REGIONS, OTHER_REGION],
        "sex": list(SEXES),
        "diagnosis": list(DIAGNOSIS_NAMES),
    }[dimension]
    return lambda name: (name == UNKNOWN, fixed.index(name) if name in fixed else len(fixed), name)


def group_label(dimension, group):
    """How a group is shown: 'nv (melanocytic nevus)', 'age band 30-49', 'body site trunk'."""
    if dimension == "diagnosis":
        return f"{group} ({DIAGNOSIS_NAMES[group]})" if group in DIAGNOSIS_NAMES else group
    return f"{DIMENSION_NAMES[dimension]} {group}"


def rows_for_files(manifest_rows, split, files):
    """The manifest row (a mapping) of each file of `split`, in the order of `files`; None for a
    file the manifest does not list."""
    by_file = {row["file"]: row for row in manifest_rows if row["split"] == split}
    return [by_file.get(name) for name in files]


CSV_COLUMNS = (
    "dimension", "group", "n_images", "n_melanoma", "n_non_melanoma", "true_positive", "false_negative",
    "false_positive", "true_negative", "sensitivity", "sensitivity_low", "sensitivity_high", "specificity",
    "specificity_low", "specificity_high", "roc_auc", "roc_auc_low", "roc_auc_high", "n_cannot_judge",
    "why_empty",
)  # fmt: skip


def csv_table(table):
    """(CSV_COLUMNS, one row per group) of metrics.subgroup_table's result; '' where empty."""
    rows = []
    for dimension, groups in table.items():
        for group, row in groups.items():
            values = {**row, "dimension": dimension, "group": group}
            for rate in ("sensitivity", "specificity", "roc_auc"):
                values[f"{rate}_low"], values[f"{rate}_high"] = row[f"{rate}_interval"] or ("", "")
            values["why_empty"] = "; ".join(f"{name}: {why}" for name, why in row["why_empty"].items())
            rows.append(["" if values[name] is None else values[name] for name in CSV_COLUMNS])
    return CSV_COLUMNS, rows
