"""tools/study.py: the statistics on hand-made numbers, resumability (completed runs are skipped, a
study folder keeps one recipe), the job graph and the reports, without training anything."""
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tools import pipeline, study

TINY = pipeline.Recipe(num_pretrain=4, num_labelled=10, pretrain_epochs=2, finetune_epochs=1,
                       seg_iters=2, n_boot=10, batch_size=4, linprobe_epochs=1, knn_k=3)


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("values", [[0.61, 0.74, 0.70], [1.0, 2.0], [3.2, 2.9, 3.5, 3.1, 2.7]])
def test_t_interval_matches_scipy(values):
    result = study.t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert result["n"] == len(values)
    assert result["mean"] == pytest.approx(np.mean(values))
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert result["sd"] == pytest.approx(np.std(values, ddof=1))


def test_t_interval_of_one_or_no_value_has_no_interval():
    assert study.t_interval([0.7]) == dict(n=1, mean=0.7, ci_low=None, ci_high=None, sd=None, clipped=False)
    assert study.t_interval([])["mean"] is None
    # three seeds: the 95 % interval is mean +- 4.303 x sd / sqrt(3)
    result = study.t_interval([1.0, 2.0, 3.0])
    assert result["ci_high"] - result["mean"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3))


def test_intervals_stay_within_the_metric_range():
    values = [0.62, 0.99, 0.70]  # three AUROCs: the t-interval reaches past 1
    raw = study.t_interval(values)
    assert raw["ci_high"] > 1 and raw["ci_low"] > 0 and not raw["clipped"]
    cut = study.t_interval(values, bounds=(0.0, 1.0))
    assert cut["clipped"] and cut["ci_high"] == 1.0 and cut["ci_low"] == pytest.approx(raw["ci_low"])
    assert cut["mean"] == raw["mean"] and cut["sd"] == raw["sd"]
    assert not study.t_interval([0.7, 0.8, 0.75], bounds=(0.0, 1.0))["clipped"]
    # differences of a 0-100 % metric lie in [-100, 100]; the summary applies each metric's range
    pair = study.compare({0: 90.0, 1: 5.0, 2: 60.0}, {0: 0.0, 1: 95.0, 2: 10.0}, top=100.0)
    assert pair["ci_low"] == -100.0 and pair["ci_high"] == 100.0 and pair["clipped"]
    arms = [study.arm_catalogue("tiny")[k] for k in ("mae", "dmae")]
    s = study.Study(Path("/nowhere"), TINY, arms, [0, 1, 2], [("dmae", "mae")])
    summary = s.summarise({"finetune_auroc": {"mae": dict(enumerate(values)),
                                              "dmae": dict(enumerate(values))}})
    assert summary["finetune_auroc"]["arms"]["mae"]["ci_high"] == 1.0


def test_paired_comparison_counts_seeds_and_ignores_unpaired_ones():
    dmae = {0: 0.80, 1: 0.70, 2: 0.65, 3: 0.90, 4: None}
    mae = {0: 0.75, 1: 0.72, 2: 0.65, 4: 0.60, 5: 0.5}
    assert study.paired_differences(dmae, mae) == pytest.approx({0: 0.05, 1: -0.02, 2: 0.0})
    result = study.compare(dmae, mae)
    assert (result["favour_first"], result["favour_second"], result["ties"]) == (1, 1, 1)
    diffs = [0.05, -0.02, 0.0]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert result["mean"] == pytest.approx(np.mean(diffs)) and result["n"] == 3
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # the paired interval is narrower than the unpaired difference of two means when the seeds
    # move both arms together
    a, b = [0.60, 0.80, 0.70], [0.58, 0.775, 0.682]
    paired = study.compare(dict(enumerate(a)), dict(enumerate(b)))
    assert paired["ci_low"] > 0
    unpaired = stats.ttest_ind(a, b)
    assert unpaired.pvalue > 0.5


def test_summary_table_shows_means_differences_and_seed_counts():
    arms = [study.arm_catalogue("tiny")[k] for k in ("mae", "dmae")]
    values = {"finetune_auroc": {"mae": {0: 0.7, 1: 0.8, 2: 0.75},
                                 "dmae": {0: 0.72, 1: 0.83, 2: 0.74}}}
    s = study.Study(Path("/nowhere"), TINY, arms, [0, 1, 2], [("dmae", "mae")])
    summary = s.summarise(values)
    table = study.summary_table(summary, arms, [("dmae", "mae")]).splitlines()
    assert table[0] == ("| Metric (test split) | MAE | Deblurring MAE | Deblurring MAE - MAE "
                        "(paired) | seeds Deblurring MAE / MAE / tie |")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    mae = study.t_interval([0.7, 0.8, 0.75])
    assert cells[0] == "Fine-tuning AUROC"
    assert cells[1] == f"{mae['mean']:.3f} [{mae['ci_low']:.3f}, {mae['ci_high']:.3f}]"
    diff = study.t_interval([0.02, 0.03, -0.01])
    assert cells[3] == f"+{diff['mean']:.3f} [{diff['ci_low']:.3f}, {diff['ci_high']:.3f}]"
    assert cells[4] == "2 / 1 / 0"


def test_verdicts_are_read_off_the_paired_intervals():
    arms = [study.arm_catalogue("tiny")[k] for k in ("mae", "dmae")]
    s = study.Study(Path("/nowhere"), TINY, arms, [0, 1, 2], [("dmae", "mae")])
    tied = s.summarise({"finetune_auroc": {"mae": {0: 0.7, 1: 0.8, 2: 0.75},
                                           "dmae": {0: 0.72, 1: 0.78, 2: 0.76}}})
    assert study.comparison_verdicts(tied, arms, [("dmae", "mae")]) == (
        "- Deblurring MAE - MAE: the paired 95 % interval contains 0 in all 1 metrics: with 3 seeds "
        "the study shows no difference between them.")
    # Deblurring MAE higher by 0.05 +- 0.005 in every seed: the interval lies above 0
    apart = s.summarise({"finetune_auroc": {"mae": {0: 0.70, 1: 0.80, 2: 0.75},
                                            "dmae": {0: 0.75, 1: 0.855, 2: 0.795}},
                         "finetune_accuracy": {"mae": {0: 0.7, 1: 0.8, 2: 0.75},
                                               "dmae": {0: 0.6, 1: 0.9, 2: 0.75}}})
    text = study.comparison_verdicts(apart, arms, [("dmae", "mae")])
    assert text == ("- Deblurring MAE - MAE: the paired 95 % interval lies above 0 in 1 and below 0 in 0 "
                    "of 2 metrics (higher: Fine-tuning AUROC); the other intervals contain 0.")


# ------------------------------------------------------------------------- job graph
def _study(tmp_path, arms=("scratch", "mae", "dmae"), seeds=(0, 1)):
    catalogue = study.arm_catalogue("tiny")
    return study.Study(tmp_path, TINY, [catalogue[k] for k in arms], list(seeds),
                       [("dmae", "mae")])


def test_every_arm_of_a_seed_reads_the_same_data(tmp_path):
    """Paired design: one data set per seed, every arm's runs read it (deblurring arms its
    blurred copy), and every run is seeded with the seed."""
    s = _study(tmp_path)
    jobs = {job.name: job for job in s.jobs()}
    for seed in (0, 1):
        data = jobs[f"s{seed}_synthetic_us"].cmd
        assert data[data.index("--seed") + 1] == seed
        assert data[data.index("--out") + 1] == tmp_path / f"seed_{seed}" / "data"
        for arm in ("scratch", "mae", "dmae"):
            cmd = [str(c) for c in jobs[f"s{seed}_finetune_{arm}"].cmd]
            expected = (f"seed_{seed}/data_blurred/gaussian_1.1/cls" if arm == "dmae"
                        else f"seed_{seed}/data_cls")
            assert cmd[cmd.index("--data_path") + 1].endswith(expected)
            assert cmd[cmd.index("--seed") + 1] == str(seed)
            assert f"s{seed}_crop_nodules" in jobs[f"s{seed}_finetune_{arm}"].after
        assert f"s{seed}_pretrain_dmae" in jobs[f"s{seed}_linprobe_dmae"].after
        assert f"s{seed}_pretrain_scratch" not in jobs
    # 5 data jobs + 2 pretrainings + per arm: fine-tune, probe, k-NN, seg. train, seg. test
    assert len(jobs) == 2 * (5 + 2 + 3 * 5)


def test_convvit_arms_have_no_segmentation(tmp_path):
    s = _study(tmp_path, arms=("convmae", "dconvmae"), seeds=(0,))
    names = [job.name for job in s.jobs()]
    assert "s0_finetune_dconvmae" in names and not any("seg_" in n for n in names)
    pretrain = next(j for j in s.jobs() if j.name == "s0_pretrain_dconvmae").cmd
    assert pretrain[pretrain.index("--model") + 1] == "dconvmae_convvit_tiny_patch16"


def _write_results(run_dir: Path, auroc: float, accuracy: float, n: int = 2):
    run_dir.mkdir(parents=True, exist_ok=True)
    metric = {"auroc": dict(value=auroc, ci_low=None, ci_high=None),
              "accuracy": dict(value=accuracy, ci_low=None, ci_high=None)}
    (run_dir / "results.json").write_text(json.dumps({"test": dict(n=n, metrics=metric)}))


def _complete_seed(s: study.Study, seed: int, score: dict):
    """Leave behind the results file of every run of ``seed`` (what the scripts write)."""
    lay = s.layout(seed)
    (lay.data).mkdir(parents=True)
    (lay.data / "features.jsonl").write_text("{}\n")
    for name in ["crop_nodules"] + [f"blur_gaussian_1.1_{what}" for what in
                                    ("pretraining", "classification", "segmentation")]:
        pipeline.write_text(lay.markers / name)
    for arm in s.arms:
        if arm.pretrain_model:
            checkpoint = lay.pretrain_checkpoint(arm, s.recipe)
            checkpoint.parent.mkdir(parents=True)
            checkpoint.write_bytes(b"weights")
        for i, folder in enumerate((lay.classification, lay.linprobe, lay.knn)):
            _write_results(folder / arm.key, score[arm.key] - 0.1 * i, 0.5 + 0.01 * seed)
        work = lay.segmentation / arm.key
        work.mkdir(parents=True)
        (work / "best_mDice_iter_2.pth").write_bytes(b"")
        pipeline.write_text(pipeline.seg_result_path(lay, arm),
                            json.dumps(dict(iou=100 * score[arm.key] - 20,
                                            dice=100 * score[arm.key])))


def test_completed_runs_are_skipped_and_an_interrupted_one_reruns(tmp_path):
    s = _study(tmp_path, seeds=(0,))
    _complete_seed(s, 0, {"scratch": 0.6, "mae": 0.7, "dmae": 0.75})
    (s.layout(0).classification / "dmae" / "results.json").write_text(
        json.dumps({"val": {"n": 2, "metrics": {}}}))  # stopped before its test split
    jobs = s.jobs()
    assert [job.name for job in jobs if not job.done()] == ["s0_finetune_dmae"]
    ran = []
    for job in jobs:  # what the runner would start: a fake in place of the script
        if job.name == "s0_finetune_dmae":
            job.cmd = None
            job.call = lambda: ran.append("finetune_dmae") or _write_results(
                s.layout(0).classification / "dmae", 0.75, 0.5)
    runner = pipeline.Runner(tmp_path / "logs", parallel=2, status_every=0)
    runner.run(*jobs)
    assert ran == ["finetune_dmae"] and runner.skipped == len(jobs) - 1
    assert all(job.done() for job in s.jobs())


def test_reports_from_the_results_files(tmp_path):
    """results.json / results.md / figures from the runs' results files: per-arm means, the
    paired difference Deblurring MAE - MAE and the seeds favouring each."""
    s = _study(tmp_path, seeds=(0, 1, 2))
    scores = [{"scratch": 0.60, "mae": 0.70, "dmae": 0.74},
              {"scratch": 0.55, "mae": 0.80, "dmae": 0.79},
              {"scratch": 0.58, "mae": 0.72, "dmae": 0.77}]
    for seed, score in enumerate(scores):
        _complete_seed(s, seed, score)
    values = s.collect()
    assert values["finetune_auroc"]["dmae"] == {0: 0.74, 1: 0.79, 2: 0.77}
    assert values["seg_dice"]["mae"] == pytest.approx({0: 70.0, 1: 80.0, 2: 72.0})
    summary = s.summarise(values)
    pair = summary["finetune_auroc"]["comparisons"]["dmae - mae"]
    assert pair["per_seed"] == pytest.approx({0: 0.04, 1: -0.01, 2: 0.05})
    assert (pair["favour_first"], pair["favour_second"]) == (2, 1)
    assert summary["knn_auroc"]["arms"]["scratch"]["mean"] == pytest.approx(np.mean([0.6, 0.55, 0.58]) - 0.2)
    info = dict(what="tiny models", invocations=[dict(
        command="python tools/study.py --preset cpu", started="now", device="CPU (2 cores)",
        wall_seconds=600.0, cpu_seconds=1000.0, load="1.0", runs=66, skipped=0, parallel=2,
        threads=1, timings=[])])
    reports = study.write_reports(s, values, summary, info)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["values"]["finetune_auroc"]["dmae"] == {"0": 0.74, "1": 0.79, "2": 0.77}
    assert record["summary"]["seg_iou"]["comparisons"]["dmae - mae"]["favour_first"] == 2
    text = (tmp_path / "results.md").read_text()
    assert reports["table"] in text and "Synthetic data" in text and "## Every seed" in text
    assert ("66 of 66 runs in 10.0 min wall clock (2 at a time, 1 thread(s) each; 16.7 min of "
            "CPU time in the runs, 8.3 min per core; load average 1.0)") in text
    for figure in ("study_metrics.png", "study_differences.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 10_000


def test_a_study_folder_keeps_one_recipe(tmp_path):
    study.check_same_recipe(tmp_path, TINY, "tiny")
    study.check_same_recipe(tmp_path, TINY, "tiny")  # the same settings continue it
    with pytest.raises(SystemExit, match=r"other settings \(finetune_epochs;"):
        study.check_same_recipe(tmp_path, pipeline.Recipe(**{**TINY.__dict__,
                                                              "finetune_epochs": 9}), "tiny")


# --------------------------------------------------------------------------------- CLI
def test_arms_blurs_and_comparisons_from_the_command_line(tmp_path):
    args = study.parse_args(["--out", str(tmp_path), "--arms", "mae", "dmae", "convmae",
                             "dconvmae", "--blur_arms", "gaussian:2.0", "median:5"])
    s, preset = study.build_study(args)
    assert [a.key for a in s.arms] == ["mae", "dmae", "convmae", "dconvmae", "dmae_gaussian_2",
                                       "dmae_median_5"]
    assert s.comparisons == [("dmae", "mae"), ("dconvmae", "convmae"), ("dmae_gaussian_2", "mae"),
                             ("dmae_median_5", "mae")]
    assert s.arms[-1].blur == pipeline.BlurSpec("median", kernel_size=5)
    assert preset.seeds == (0, 1, 2)
    with pytest.raises(SystemExit, match="unknown arm"):
        study.build_study(study.parse_args(["--arms", "dmea"]))
    with pytest.raises(SystemExit, match="--compare dmae:scratch"):
        study.build_study(study.parse_args(["--arms", "mae", "dmae", "--compare",
                                            "dmae:scratch"]))
    with pytest.raises(SystemExit):
        study.parse_args(["--blur_arms", "gaussian:wide"])


def test_gpu_preset_dry_run_lists_every_run(tmp_path, capsys):
    assert study.main(["--preset", "gpu", "--out", str(tmp_path / "g"), "--seeds", "0",
                       "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[to run]") == 5 + 2 + 3 * 5
    assert "--model dmae_vit_base_patch16" in out and "model.backbone.arch=base_patch16" in out
    assert not (tmp_path / "g").exists()  # a dry run writes nothing


def test_readme_study_results_are_the_recorded_cpu_study():
    """README's Study results are what `--update_readme` renders from the recorded CPU study
    (docs/study-cpu-results.json), made with the CPU preset as it is now."""
    record = json.loads(study.README_RECORD.read_text())
    assert record["recipe"] == asdict(study.PRESETS["cpu"].recipe)
    assert record["seeds"] == list(study.PRESETS["cpu"].seeds)
    assert [a["key"] for a in record["arms"]] == list(study.PRESETS["cpu"].arms)
    begin, end = study.README_MARKERS
    readme = study.README.read_text()
    block = readme.split(begin)[1].split(end)[0]
    assert block.strip() == study.readme_block(record).strip()
    for name in study.README_FIGURES.values():
        assert (study.REPO / "figure" / name).stat().st_size > 5_000
