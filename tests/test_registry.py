"""The plugin registry: loading, look-ups, broken plugins, clashes, splits and leakage."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clirun import call_mvit, run_mvit
from datasets_factory import make_dermmel, make_ham10000, write_image
from mvit.errors import ConfigError, PluginError
from mvit.datasets import leakage, splits
from mvit.registry import DatasetSpec, HeadSpec, Sample, hookimpl, loading, manager

BUILT_IN = {"dermmel", "ham10000", "ph2"}


@pytest.fixture(autouse=True)
def fresh_registry():
    manager.reset()
    yield
    manager.reset()


def toy_dataset(name: str = "toy", labels: tuple[str, ...] = ("a", "b"), **fields) -> DatasetSpec:
    return DatasetSpec(name=name, title=f"{name} dataset", labels=labels, load=lambda root: [], **fields)


class ToyPlugin:
    """Registers dataset `toy` with labels a, b and a head over it."""

    @hookimpl
    def register_datasets(self, register):
        register(toy_dataset())

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="toy", dataset="toy", classes=("a", "b"), positive="a"))


class OtherToyPlugin:
    """Registers a second head named `toy`: a clash with ToyPlugin."""

    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="toy", dataset="toy", classes=("b", "a")))


# ---- loading -----------------------------------------------------------------------------------


def test_built_in_plugins_come_through_entry_points_with_their_distribution():
    registry = loading.build_registry()
    assert BUILT_IN <= set(registry.plugins)
    for name in BUILT_IN:
        info = registry.plugins[name]
        assert (info.distribution, info.version) == ("mvit", "0.1.0")
        assert info.datasets == (name,)
    assert registry.warnings == []


def test_built_in_heads_and_their_classes():
    heads = {head.name: head for head in manager.list_heads()}
    assert heads["ham10000"].classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert heads["ph2"].classes == ("common_nevus", "atypical_nevus", "melanoma")
    for binary in ("dermmel", "ham10000-mel", "ph2-mel"):
        assert heads[binary].classes == ("melanoma", "not_melanoma")
        assert heads[binary].positive == "melanoma"
    assert heads["ham10000-mel"].class_of("mel") == "melanoma"
    assert heads["ham10000-mel"].class_of("nv") == "not_melanoma"
    assert heads["ph2-mel"].class_of("atypical_nevus") == "not_melanoma"
    assert heads["dermmel"].class_of("NotMelanoma") == "not_melanoma"
    assert {d.name for d in manager.list_datasets()} >= BUILT_IN
    assert manager.get_dataset("dermmel").official_splits


def test_unknown_names_list_the_known_ones():
    with pytest.raises(PluginError, match=r"no installed plugin offers a head named 'nope'.*ham10000-mel.*ph2"):
        manager.get_head("nope")
    with pytest.raises(PluginError, match=r"dataset named 'nope'.*dermmel, ham10000"):
        manager.get_dataset("nope")


@pytest.mark.parametrize(
    "value, expected",
    [("", set()), ("ph2", {"ph2"}), (" ph2 , dermmel ", {"ph2", "dermmel"}), ("mvit", BUILT_IN)],
)
def test_env_var_restricts_plugins_by_entry_point_or_distribution_name(monkeypatch, value, expected):
    monkeypatch.setenv(loading.ENV_LOAD_PLUGINS, value)
    registry = loading.build_registry()
    assert set(registry.plugins) == expected
    assert registry.warnings == []


def test_env_var_naming_an_absent_plugin_is_a_warning(monkeypatch):
    monkeypatch.setenv(loading.ENV_LOAD_PLUGINS, "ph2,not-installed")
    registry = loading.build_registry()
    assert set(registry.plugins) == {"ph2"}
    assert [w.plugin for w in registry.warnings] == ["not-installed"]


def test_temporary_plugins_are_seen_by_every_look_up_and_then_gone():
    with manager.temporary_plugins(ToyPlugin()) as registry:
        assert manager.get_head("toy").positive == "a"
        assert registry.plugins["ToyPlugin"].distribution == loading.IN_PROCESS
        assert registry.plugins["ToyPlugin"].heads == ("toy",)
    with pytest.raises(PluginError):
        manager.get_head("toy")


# ---- broken plugins and clashes ----------------------------------------------------------------


class RaisingPlugin:
    @hookimpl
    def register_datasets(self, register):
        raise RuntimeError("the plugin's own bug")


class InvalidSpecPlugin:
    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="bad", dataset="toy", classes=("a", "b"), positive="c"))


class WrongTypePlugin:
    @hookimpl
    def register_datasets(self, register):
        register({"name": "dict", "title": "a dict is not a spec", "labels": ["a"]})


class MisspelledHookPlugin:
    @hookimpl
    def register_dataset(self, register):  # missing "s": pluggy would never call it
        register(toy_dataset("typo"))


class WrongArgumentPlugin:
    @hookimpl
    def register_heads(self, add):  # the hook passes `register`
        pass


class HeadWithoutDatasetPlugin:
    @hookimpl
    def register_heads(self, register):
        register(HeadSpec(name="orphan", dataset="nowhere", classes=("a", "b")))


class HeadMissingALabelPlugin:
    @hookimpl
    def register_heads(self, register):
        # ph2 has three labels; this head neither lists nor maps atypical_nevus
        register(HeadSpec(name="ph2-partial", dataset="ph2", classes=("melanoma", "common_nevus")))


class FailsInSecondHookPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(toy_dataset("half"))

    @hookimpl
    def register_heads(self, register):
        raise ValueError("no heads today")


@pytest.mark.parametrize(
    "plugin, message",
    [
        (RaisingPlugin(), "failed in register_datasets: RuntimeError: the plugin's own bug"),
        (InvalidSpecPlugin(), "failed in register_heads: invalid HeadSpec"),
        (WrongTypePlugin(), "failed in register_datasets: TypeError: register_datasets expects DatasetSpec objects"),
        (MisspelledHookPlugin(), "unknown hook 'register_dataset'"),
        (WrongArgumentPlugin(), "could not be registered"),
        (HeadWithoutDatasetPlugin(), "its dataset 'nowhere' is not registered"),
        (HeadMissingALabelPlugin(), "labels ['atypical_nevus'] are neither classes of the head nor in its label_map"),
        (FailsInSecondHookPlugin(), "failed in register_heads: ValueError: no heads today"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else "",
)
def test_a_broken_plugin_is_a_warning_and_the_rest_keep_working(plugin, message):
    registry = loading.build_registry([ToyPlugin(), plugin])
    assert len(registry.warnings) == 1, registry.warnings
    assert message in registry.warnings[0].message
    assert registry.warnings[0].plugin == type(plugin).__name__
    assert BUILT_IN <= set(registry.datasets) and "toy" in registry.heads
    # nothing of the broken plugin stays behind
    assert {"typo", "half", "bad", "orphan", "ph2-partial"}.isdisjoint(set(registry.datasets) | set(registry.heads))


def test_only_the_head_is_skipped_when_a_head_has_no_dataset():
    registry = loading.build_registry([ToyPlugin(), HeadWithoutDatasetPlugin()])
    [warning] = registry.warnings
    assert warning.sentence().startswith("head 'orphan' of plugin 'HeadWithoutDatasetPlugin' ((in-process)) skipped: its dataset")
    with pytest.raises(PluginError, match=r"the head 'orphan' is installed but skipped: its dataset 'nowhere'"):
        registry.get_head("orphan")


def test_the_second_plugin_to_register_a_head_name_is_skipped_whole_and_the_first_keeps_working():
    registry = loading.build_registry([ToyPlugin(), OtherToyPlugin()])
    [warning] = registry.warnings
    assert (warning.plugin, warning.level) == ("OtherToyPlugin", "error")
    assert "head name 'toy', which plugin 'ToyPlugin' ((in-process)) already registered" in warning.message
    assert registry.plugin_of("head", "toy").name == "ToyPlugin" and "OtherToyPlugin" not in registry.plugins


def test_a_plugin_reusing_a_built_in_name_is_skipped_and_the_built_in_is_kept():
    class Impostor:
        @hookimpl
        def register_datasets(self, register):
            register(toy_dataset("ph2"))
            register(toy_dataset("impostor-extra"))

    registry = loading.build_registry([Impostor()])
    [warning] = registry.warnings
    assert warning.level == "error" and "dataset name 'ph2', which plugin 'ph2' (mvit) already registered" in warning.message
    assert registry.plugin_of("dataset", "ph2").distribution == "mvit" and registry.get_dataset("ph2").name == "ph2"
    with pytest.raises(PluginError, match=r"the dataset 'impostor-extra' is installed but skipped: plugin 'Impostor'"):
        registry.get_dataset("impostor-extra")


def test_a_mistyped_name_gets_a_suggestion():
    registry = loading.build_registry()
    with pytest.raises(PluginError, match=r"no installed plugin offers a head named 'ph2mel'; did you mean 'ph2-mel'\?"):
        registry.get_head("ph2mel")
    with pytest.raises(PluginError, match=r"did you mean 'ham10000'\?"):
        registry.get_dataset("ham1000")


def test_a_misspelled_hook_gets_a_suggestion():
    registry = loading.build_registry([MisspelledHookPlugin()])
    assert "did you mean 'register_datasets'?" in registry.warnings[0].message


def fake_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str] = {}) -> None:
    """An installed distribution as importlib.metadata sees it: a .dist-info folder (and modules)."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {module}" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mvit]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


TYPO_MODULE = """
    from mvit.registry import hookimpl

    @hookimpl
    def register_head(register):
        pass
"""


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    """Real entry points that fail: one module that does not import, one with a misspelled hook."""
    site = tmp_path / "site"
    fake_distribution(site, "mvit-broken", {"broken": "mvit_broken_no_such_module"})
    fake_distribution(site, "mvit-typo", {"typo": "mvit_typo_plugin"}, {"mvit_typo_plugin": TYPO_MODULE})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_points_that_fail_to_import_or_misspell_a_hook_are_skipped(broken_site):
    registry = loading.build_registry()
    warnings = {w.plugin: w for w in registry.warnings}
    assert set(warnings) == {"broken", "typo"}
    assert warnings["broken"].distribution == "mvit-broken"
    assert "ModuleNotFoundError" in warnings["broken"].message
    assert "unknown hook 'register_head'" in warnings["typo"].message
    assert BUILT_IN <= set(registry.plugins)


def test_mvit_plugins_lists_broken_plugins_as_warnings_and_still_succeeds(broken_site):
    result = run_mvit("plugins", env={"PYTHONPATH": str(broken_site)})
    assert result.code == 0, result.stderr
    assert "warning: plugin 'broken' (mvit-broken) skipped" in result.stderr
    assert "Traceback" not in result.stderr
    assert "ph2-mel" in result.stdout


def test_a_second_distribution_claiming_a_plugin_name_is_skipped_and_the_built_in_kept(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "mvit-other-ph2", {"ph2": "mvit_other_ph2"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = loading.build_registry()
    [warning] = registry.warnings
    assert (warning.distribution, warning.level) == ("mvit-other-ph2", "error")
    assert "plugin name 'ph2' is already taken by distribution 'mvit'" in warning.message
    assert registry.plugins["ph2"].distribution == "mvit" and "ph2-mel" in registry.heads


def test_a_plugin_failure_keeps_its_traceback_for_the_author(broken_site, monkeypatch):
    registry = loading.build_registry()
    broken = next(w for w in registry.warnings if w.plugin == "broken")
    assert "Traceback" in broken.traceback and "mvit_broken_no_such_module" in broken.traceback
    assert "traceback" not in registry.as_dict()["warnings"][0]  # only when debugging
    monkeypatch.setenv("MVIT_DEBUG", "1")
    assert any("Traceback" in (w.get("traceback") or "") for w in registry.as_dict()["warnings"])


# ---- the commands ------------------------------------------------------------------------------


def test_mvit_plugins_json_lists_plugins_datasets_heads(capsys, monkeypatch):
    result = call_mvit(capsys, monkeypatch, "plugins", "--format", "json")
    assert result.code == 0
    summary = json.loads(result.stdout)
    plugins = {p["name"]: p for p in summary["plugins"]}
    assert plugins["ph2"] == {
        "name": "ph2", "distribution": "mvit", "version": "0.1.0", "datasets": ["ph2"], "heads": ["ph2", "ph2-mel"]
    }
    heads = {h["name"]: h for h in summary["heads"]}
    assert heads["ham10000"]["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert heads["ph2-mel"]["positive"] == "melanoma" and heads["ph2-mel"]["plugin"] == "ph2"
    datasets = {d["name"]: d for d in summary["datasets"]}
    assert datasets["ham10000"]["heads"] == ["ham10000", "ham10000-mel"]
    assert "Tschandl" in datasets["ham10000"]["citation"]
    assert summary["warnings"] == []


def test_mvit_plugins_table_and_csv(capsys, monkeypatch):
    table = call_mvit(capsys, monkeypatch, "plugins")
    assert table.code == 0 and "ham10000-mel" in table.stdout and "distribution" in table.stdout
    rows = call_mvit(capsys, monkeypatch, "plugins", "--format", "csv").stdout.splitlines()
    assert rows[0] == "head,dataset,classes,positive,plugin"
    assert 'ph2,ph2,"common_nevus, atypical_nevus, melanoma",,ph2' in rows


def test_a_name_clash_is_an_error_row_and_everything_else_keeps_working(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "mvit-other-ph2", {"ph2": "mvit_other_ph2"})
    result = run_mvit("plugins", env={"PYTHONPATH": str(tmp_path)})
    assert result.code == 0, result.stderr
    assert "ph2-mel" in result.stdout and "ham10000" in result.stdout
    assert "plugin name 'ph2' is already taken by distribution 'mvit'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["plugins", "--format", "json"], ["data", "check", "dermmel", "--root", "{root}"]])
def test_registry_commands_do_not_import_torch(tmp_path, args):
    root = make_dermmel(tmp_path)
    args = [arg.format(root=root) for arg in args]
    code = textwrap.dedent(
        f"""
        import sys
        from mvit.cli.app import app
        try:
            app({args!r}, standalone_mode=False)
        finally:
            print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "NO-TORCH"


# ---- splits ------------------------------------------------------------------------------------

SPLITTABLE = toy_dataset("splittable", labels=("a", "b", "c"))


def synthetic(groups_per_label=(40, 30, 10), images_per_group=3) -> list[Sample]:
    samples = []
    for label, groups in zip("abc", groups_per_label):
        for g in range(groups):
            for i in range(images_per_group):
                samples.append(Sample(path=Path(f"/data/{label}{g}_{i}.jpg"), label=label, group=f"{label}{g}"))
    return samples


def groups_of(result: dict[str, list[Sample]]) -> dict[str, set[str]]:
    return {split: {s.group for s in items} for split, items in result.items()}


def test_splits_are_grouped_stratified_and_follow_the_fractions():
    result = splits.split_samples(synthetic(), SPLITTABLE, seed=1)
    groups = groups_of(result)
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"] or groups["valid"] & groups["test"])
    assert sum(len(items) for items in result.values()) == 3 * 80
    # 70/15/15 of each label's groups, each count within one of the exact share
    for label, total in zip("abc", (40, 30, 10)):
        for split, share in SPLITTABLE.split_fractions.items():
            assert abs(len({s.group for s in result[split] if s.label == label}) - total * share) < 1
    assert len(groups["train"]) == 56  # 28 + 21 + 7: whole numbers need no rounding
    assert abs(len(groups["valid"]) - len(groups["test"])) <= 1  # rounding alternates between them
    assert all(s.split == split for split, items in result.items() for s in items)


def test_small_classes_still_fill_every_split():
    # three groups per class: 2.1 / 0.45 / 0.45 each; the third group alternates valid, test, ...
    samples = [Sample(path=Path(f"/d/{c}{g}.jpg"), label=c, group=f"{c}{g}") for c in "abcdefgh" for g in range(3)]
    spec = toy_dataset("eight", labels=tuple("abcdefgh"))
    sizes = {split: len(items) for split, items in splits.split_samples(samples, spec).items()}
    assert sizes == {"train": 16, "valid": 4, "test": 4}


def test_splits_are_deterministic_whatever_the_input_order_and_change_with_the_seed():
    samples = synthetic()
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    first = groups_of(splits.split_samples(samples, SPLITTABLE, seed=7))
    assert groups_of(splits.split_samples(shuffled, SPLITTABLE, seed=7)) == first
    assert groups_of(splits.split_samples(samples, SPLITTABLE, seed=8)) != first


def test_custom_fractions_and_bad_ones():
    result = splits.split_samples(synthetic(), SPLITTABLE, fractions={"train": 0.5, "test": 0.5})
    assert result["valid"] == [] and len(result["train"]) == len(result["test"])
    with pytest.raises(ConfigError, match="sum to 1"):
        splits.split_samples(synthetic(), SPLITTABLE, fractions={"train": 0.5, "test": 0.4})
    with pytest.raises(ConfigError, match="has no split 'holdout'"):
        splits.split_samples(synthetic(), SPLITTABLE, fractions={"train": 0.5, "holdout": 0.5})


def test_k_fold_tests_every_group_exactly_once_stratified():
    samples = synthetic(groups_per_label=(12, 9, 5))
    tested: Counter[str] = Counter()
    for fold in range(5):
        result = splits.split_samples(samples, SPLITTABLE, fold=fold, folds=5, seed=2)
        groups = groups_of(result)
        assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"] or groups["valid"] & groups["test"])
        assert sum(len(items) for items in result.values()) == len(samples)
        tested.update(groups["test"])
        # each fold holds every class: round-robin dealing per label keeps them stratified
        assert {s.label for s in result["test"]} == {"a", "b", "c"}
        assert result["valid"], "the training folds also give a validation split"
    assert set(tested.values()) == {1} and len(tested) == 26


def test_k_fold_arguments_are_checked():
    with pytest.raises(ConfigError, match="between 0 and 4"):
        splits.split_samples(synthetic(), SPLITTABLE, fold=5, folds=5)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        splits.split_samples(synthetic(), SPLITTABLE, fold=0, folds=1)
    with pytest.raises(ConfigError, match="dermmel comes with official splits"):
        splits.split_samples([], manager.get_dataset("dermmel"), fold=0)


def test_official_splits_are_kept_and_augmented_copies_stay_out_of_evaluation():
    spec = toy_dataset("official", official_splits=True)
    samples = [
        Sample(path=Path("/d/1.jpg"), label="a", group="1", split="train"),
        Sample(path=Path("/d/2.jpg"), label="b", group="2", split="test"),
        Sample(path=Path("/d/AUG_1.jpg"), label="a", group="AUG_1", split="train", meta={"augmented": True}),
        Sample(path=Path("/d/AUG_2.jpg"), label="b", group="AUG_2", split="valid", meta={"augmented": True}),
    ]
    result = splits.split_samples(samples, spec)
    assert [s.path.name for s in result["train"]] == ["1.jpg", "AUG_1.jpg"]
    assert result["valid"] == [] and [s.path.name for s in result["test"]] == ["2.jpg"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30)), min_size=1, max_size=120),
    st.integers(0, 2**31),
)
def test_any_dataset_splits_into_a_partition_that_never_splits_a_group(rows, seed):
    samples = [Sample(path=Path(f"/d/{i}.jpg"), label=label, group=f"g{g}") for i, (label, g) in enumerate(rows)]
    result = splits.split_samples(samples, SPLITTABLE, seed=seed)
    assert sorted(s.path for items in result.values() for s in items) == sorted(s.path for s in samples)
    owner: dict[str, str] = {}
    for split, items in result.items():
        for sample in items:
            assert owner.setdefault(sample.group, split) == split


def test_samples_for_loads_and_splits_a_dataset_folder(tmp_path):
    root = make_ham10000(tmp_path / "ham")
    train = splits.samples_for("ham10000", root, "train", seed=0)
    test = splits.samples_for("ham10000", root, "test", seed=0)
    assert {s.group for s in train}.isdisjoint({s.group for s in test})
    assert all(s.split == "train" and s.path.is_file() for s in train)
    fold_test = splits.samples_for("ham10000", root, "test", fold=0, folds=3)
    assert len(fold_test) == pytest.approx(84 / 3, abs=2)
    with pytest.raises(ConfigError, match="has no split 'holdout'"):
        splits.samples_for("ham10000", root, "holdout")


# ---- leakage -----------------------------------------------------------------------------------


def test_shared_images_are_found_by_content_and_by_isic_id(tmp_path):
    derm = make_dermmel(tmp_path / "derm", augmented=0)
    ham = make_ham10000(tmp_path / "ham")  # ids start at ISIC_0024306, as DermMel's do
    # byte-identical copy under another name: only the content matches
    shutil.copy(ham / "HAM10000_images_part_1" / "ISIC_0024306.jpg", derm / "DermMel" / "test" / "Melanoma" / "copy.jpg")
    d = splits.split_dataset("dermmel", derm)
    h = splits.split_dataset("ham10000", ham)
    shared = leakage.find_shared({"dermmel": d, "ham10000": h})
    by = Counter(image.by for image in shared)
    assert by[("isic_id",)] == 23  # DermMel names are HAM ids with other bytes (one joins the copy below)
    assert by[("content",)] == 0
    # the copy joins ISIC_0024306 (same bytes) with DermMel's own ISIC_0024306.jpg (same id): one image
    joined = [image for image in shared if image.by == ("content", "isic_id")]
    assert len(joined) == 1 and len(joined[0].members) == 3 and joined[0].isic_id == "ISIC_0024306"
    assert leakage.LeakageReport(shared=shared).pair_counts() == {("dermmel", "ham10000"): 24}


def test_training_images_in_an_evaluation_split_elsewhere_are_excluded_with_their_lesion(tmp_path):
    a, b, c, d = (write_image(tmp_path / name) for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    twin = tmp_path / "other" / "twin_of_a.jpg"
    twin.parent.mkdir()
    shutil.copy(a, twin)
    first = {
        "train": [
            Sample(path=a, label="x", group="lesion1"),
            Sample(path=b, label="x", group="lesion1"),  # same lesion as a: leaks too
            Sample(path=c, label="x", group="lesion2"),
        ],
        "test": [Sample(path=d, label="x", group="lesion3")],
    }
    second = {"train": [], "test": [Sample(path=twin, label="y", group="t")]}
    cleaned, report = leakage.exclude_shared({"first": first, "second": second})
    assert [s.path for s in cleaned["first"]["train"]] == [c]
    assert cleaned["first"]["test"] == first["test"] and cleaned["second"]["test"] == second["test"]
    assert {m.path for m in report.excluded} == {a, b}
    assert report.pair_counts() == {("first", "second"): 1}


def test_images_shared_only_between_training_splits_stay(tmp_path):
    a = write_image(tmp_path / "a.jpg")
    twin = tmp_path / "twin.jpg"
    shutil.copy(a, twin)
    cleaned, report = leakage.exclude_shared(
        {"one": {"train": [Sample(path=a, label="x", group="1")]}, "two": {"train": [Sample(path=twin, label="x", group="2")]}}
    )
    assert len(cleaned["one"]["train"]) == 1 and len(cleaned["two"]["train"]) == 1
    assert report.excluded == [] and len(report.shared) == 1


def test_leak_free_splits_and_the_leaks_command(tmp_path, capsys, monkeypatch):
    derm = make_dermmel(tmp_path / "derm", augmented=0)
    ham = make_ham10000(tmp_path / "ham")
    cleaned, report = leakage.leak_free_splits({"dermmel": derm, "ham10000": ham})
    removed = {(m.dataset, m.path) for m in report.excluded}
    for name, per_split in cleaned.items():
        evaluation = {s.path.name for split in ("valid", "test") for data in cleaned.values() for s in data[split]}
        assert all(s.path.name not in evaluation for s in per_split["train"])
    assert removed, "the generated sets share ids, so some training images must go"
    result = call_mvit(capsys, monkeypatch, "data", "leaks", f"dermmel={derm}", f"ham10000={ham}", "--format", "json")
    assert result.code == 0
    summary = json.loads(result.stdout)
    assert len(summary["shared"]) == 24
    assert len(summary["excluded_from_training"]) == len(report.excluded)
    bad = call_mvit(capsys, monkeypatch, "data", "leaks", "dermmel")
    assert bad.code == 2 and "expected NAME=DIR" in bad.stderr


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"classes": ("a", "b", "c"), "positive": "a"}, "is for a two-class head only"),
        ({"classes": ("unknown", "known")}, "'unknown' is the label of an abstained prediction"),
    ],
)
def test_heads_that_predict_could_not_answer_for_are_refused(changes, says):
    with pytest.raises(ValueError, match=says):
        HeadSpec(**{"name": "h", "dataset": "d", "classes": ("a", "b"), **changes})


BUGGY_LOADER = """
    from mvit.registry import DatasetSpec, hookimpl

    def load(root):
        return 1 / 0

    @hookimpl
    def register_datasets(register):
        register(DatasetSpec(name="buggy", title="Buggy", labels=("a", "b"), load=load))
"""


def test_mvit_debug_shows_the_plugin_authors_traceback(tmp_path, broken_site):
    fake_distribution(broken_site, "mvit-buggy", {"buggy": "mvit_buggy_plugin"}, {"mvit_buggy_plugin": BUGGY_LOADER})
    env = {"PYTHONPATH": str(broken_site)}
    quiet = run_mvit("data", "check", "buggy", "--root", str(tmp_path), env=env)
    assert quiet.code == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()]
    assert "ZeroDivisionError" in quiet.stderr and "MVIT_DEBUG=1" in quiet.stderr
    loud = run_mvit("data", "check", "buggy", "--root", str(tmp_path), env={**env, "MVIT_DEBUG": "1"})
    assert loud.code == 2 and "Traceback" in loud.stderr and "return 1 / 0" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()  # the sentence still ends it

    listing = run_mvit("plugins", env={**env, "MVIT_DEBUG": "1"})
    assert listing.code == 0 and "Traceback" in listing.stderr and "mvit_broken_no_such_module" in listing.stderr
    assert "Traceback" not in run_mvit("plugins", env=env).stderr


def official_plugin(samples_of):
    """A plugin whose dataset `official` has official splits, its samples made by `samples_of(root)`."""

    class Official:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="official", title="official", labels=("a", "b"), official_splits=True, load=samples_of))

    return Official()


def test_official_splits_missing_on_some_samples_state_the_rule(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"{i}.jpg")

    def samples(root):
        return [Sample(path=root / f"{i}.jpg", label="a", group=str(i), split="train" if i % 2 else None) for i in range(6)]

    with manager.temporary_plugins(official_plugin(samples)):
        with pytest.raises(PluginError, match=r"declares official splits, so its loader must give every sample one of "
                                              r"train, valid, test; 3 samples of 6 do not \(the first, .*0.jpg, has no split\)"):
            splits.split_dataset("official", tmp_path)


def test_data_check_warns_about_one_isic_image_in_two_splits(tmp_path):
    from mvit.datasets.check import check_dataset

    names = {"ISIC_0000001.jpg": "train", "ISIC_0000001_downsampled.jpg": "test", "ISIC_0000002.jpg": "valid"}
    for i, name in enumerate(names):
        write_image(tmp_path / name, seed=i)  # different bytes: only the ISIC id ties the first two

    def samples(root):
        return [Sample(path=root / name, label="a", group=name, split=split) for name, split in names.items()]

    with manager.temporary_plugins(official_plugin(samples)):
        report = check_dataset("official", tmp_path)
    assert report.isic_ids_across_splits == ["ISIC_0000001 (test, train)"]
    assert any(w.startswith("1 ISIC id in more than one split") for w in report.warnings)
