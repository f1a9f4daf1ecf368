"""make quality's own arithmetic and text handling (the runs themselves are real commands,
checked by the demo's end-to-end test): WikiText's detokenization and split, the run list, and
the gap-closed figures from curves written here."""

import pytest

from scripts.quality import (
    QualityConfig,
    detokenize_wikitext,
    gap_closed,
    headline,
    lm_runs,
    split_wikitext,
)


def test_wikitext_spacing_is_undone_as_natural_text_writes_it():
    raw = (
        " = Little Gidding ( poem ) = \n"
        " Little Gidding is the fourth poem of T. S. Eliot 's Four Quartets , a series . It was "
        "delayed by the air @-@ raids ; 1 @,@ 000 copies cost $ 2 @.@ 50 ( 10 % ) . \n"
        " = = Background = = \n"
        " He said \" it is not done \" , and the poets ' drafts weren 't kept [ 3 ] . \n"
    )
    assert detokenize_wikitext(raw) == (
        "# Little Gidding (poem)\n"
        "Little Gidding is the fourth poem of T. S. Eliot's Four Quartets, a series. It was "
        "delayed by the air-raids; 1,000 copies cost $2.50 (10%).\n"
        "## Background\n"
        "He said \"it is not done\", and the poets' drafts weren't kept [3].\n"
    )


@pytest.mark.parametrize("natural", [True, False])
def test_every_tenth_article_is_held_out(tmp_path, natural):
    source = tmp_path / "wiki.test.raw"
    articles = [
        f" = Article {index} = \n Text of article {index} , here . \n" for index in range(20)
    ]
    source.write_text("".join(articles))
    train, heldout = split_wikitext(source, tmp_path / "data", natural)
    held = heldout.read_text()
    trained = train.read_text()
    assert "article 9" in held and "article 19" in held and "article 8" not in held
    assert "article 9" not in trained and trained.count("Text of") == 18
    assert ("article 9, here." in held) is natural
    assert ("article 9 , here ." in held) is not natural


def test_the_gap_closed_is_read_from_the_seed_means_at_equal_steps():
    def curve(*values):
        return [
            {"step": step, "eval_ce": ce, "eval_kl": kl, "eval_top1": 0.0}
            for step, (ce, kl) in zip((0, 10), values, strict=True)
        ]

    lm = {
        "teacher_ce": 4.0,
        "runs": {
            "kd-seed0": {"curve": curve((6.0, 2.0), (4.5, 0.6))},
            "sft-seed0": {"curve": curve((6.0, 2.0), (5.0, 1.2))},
            "kd-seed1": {"curve": curve((6.0, 2.0), (4.7, 0.8))},
            "sft-seed1": {"curve": curve((6.0, 2.0), (5.2, 1.0))},
        },
    }
    final = headline(lm)["final"]
    # SFT mean 5.1, KD mean 4.6: (5.1 - 4.6) / (5.1 - 4.0); KL (1.1 - 0.7) / 1.1
    assert final["gap_closed_ce"] == pytest.approx(0.5 / 1.1)
    assert final["gap_closed_kl"] == pytest.approx(0.4 / 1.1)
    assert final["sft_ce_spread"] == pytest.approx(0.2)
    assert gap_closed(5.0, 5.0, 5.0) != gap_closed(5.0, 5.0, 5.0)  # nan: no gap to close


def test_runs_are_the_headline_pair_per_seed_then_each_ablation_that_changes_the_recipe():
    config = QualityConfig(
        seeds=2, ablations=("alpha=0", "alpha=0.5", "loss=rkl"), budgets=(1,), levers=()
    )
    runs = lm_runs(config)
    assert list(runs) == ["kd-seed0", "sft-seed0", "kd-seed1", "sft-seed1", "kd-alpha=0",
                          "kd-loss=rkl"]  # fmt: skip
    assert runs["kd-loss=rkl"]["settings"] == {**config.recipe, "loss": "rkl"}
    assert runs["sft-seed1"] == {
        "kind": "sft", "seed": 1, "settings": {"loss": "ce"}, "budget": 1, "shards": "train"
    }  # fmt: skip


def test_budget_runs_pair_kd_with_sft_and_the_largest_budget_has_its_own_seeds():
    config = QualityConfig(seeds=2, ablations=(), budgets=(1, 2, 4), budget_seeds=2,
                           levers=("sampled",))  # fmt: skip
    runs = lm_runs(config)
    assert list(runs) == [
        "kd-seed0", "sft-seed0", "kd-seed1", "sft-seed1",
        "kd-budget2-seed0", "sft-budget2-seed0",
        "kd-budget4-seed0", "sft-budget4-seed0", "kd-budget4-seed1", "sft-budget4-seed1",
        "kd-lever-topk", "kd-lever-sampled",
    ]  # fmt: skip
    assert runs["sft-budget4-seed1"]["budget"] == 4 and runs["sft-budget4-seed1"]["seed"] == 1
    assert runs["kd-lever-sampled"]["shards"] == "lever-sampled"
    assert runs["kd-lever-topk"]["settings"] == config.recipe
    with pytest.raises(Exception, match="include 1"):
        QualityConfig(budgets=(2, 4))
    with pytest.raises(Exception, match="unknown nope"):
        QualityConfig(levers=("nope",))


def test_sft_tokens_to_reach_a_ce_interpolate_in_log_tokens_between_bracketing_budgets():
    import math

    from scripts.quality import sft_tokens_to_reach

    sft = [(4000, 4.0), (1000, 5.0), (2000, 4.5)]  # unsorted on purpose
    # 4.25 lies halfway between 4.5 (2000 tokens) and 4.0 (4000): the geometric mean
    tokens, bound = sft_tokens_to_reach(4.25, sft)
    assert bound == "exact" and tokens == pytest.approx(math.sqrt(2000 * 4000))
    # 4.9 is a tenth of the way from 5.0 to 4.5: 1000 * 2 ** 0.2
    assert sft_tokens_to_reach(4.9, sft)[0] == pytest.approx(1000 * 2**0.2)
    assert sft_tokens_to_reach(3.9, sft) == (4000.0, "at least")
    assert sft_tokens_to_reach(5.2, sft) == (1000.0, "at most")


def test_the_budget_table_reads_seed_means_and_the_multiplier_from_sft_at_every_budget():
    from scripts.quality import budget_table

    def run(kind, budget, ce):
        return {"kind": kind, "budget": budget, "curve": [{"step": 1, "eval_ce": ce}]}

    config = QualityConfig(steps=10, micro_batch=2, chunk_tokens=5, budgets=(1, 2))
    lm = {
        "teacher_ce": 3.0,
        "runs": {
            "kd-seed0": run("kd", 1, 4.5), "kd-seed1": run("kd", 1, 4.7),
            "sft-seed0": run("sft", 1, 5.0), "sft-seed1": run("sft", 1, 5.0),
            "kd-budget2-seed0": run("kd", 2, 4.0), "sft-budget2-seed0": run("sft", 2, 4.4),
            "kd-alpha=0": run("ablation", 1, 1.0),
        },
    }  # fmt: skip
    first, second = budget_table(lm, config)
    assert first["tokens"] == 100 and second["tokens"] == 200
    assert first["kd_ce"] == pytest.approx(4.6) and first["kd_ce_spread"] == pytest.approx(0.2)
    assert first["gap_closed_ce"] == pytest.approx(0.4 / 2.0)
    # KD's 4.6 at 100 tokens: SFT gets there two thirds of the way (in log tokens) to 200
    assert first["bound"] == "exact"
    assert first["multiplier"] == pytest.approx(2 ** (0.4 / 0.6))
    assert second["bound"] == "at least" and second["multiplier"] == pytest.approx(1.0)


def test_the_paired_rouge_difference_has_a_bootstrap_interval_near_the_normal_one():
    import numpy as np

    from scripts.quality import paired_difference

    constant = paired_difference([0.3, 0.5, 0.2], [0.2, 0.4, 0.1])
    assert constant["mean"] == pytest.approx(0.1)
    assert constant["low"] == pytest.approx(0.1) and constant["high"] == pytest.approx(0.1)
    generator = np.random.default_rng(1)
    first = generator.uniform(0, 1, 400)
    second = first - generator.normal(0.02, 0.1, 400)
    figure = paired_difference(list(first), list(second))
    differences = first - second
    half_width = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert figure["mean"] == pytest.approx(differences.mean())
    assert figure["low"] == pytest.approx(differences.mean() - half_width, abs=0.002)
    assert figure["high"] == pytest.approx(differences.mean() + half_width, abs=0.002)
    assert figure["samples"] == 400


def test_an_evaluation_is_reused_only_for_the_same_models_none_newer(tmp_path):
    import json
    import os

    from scripts.pipeline import evaluation_is_current

    models = {name: tmp_path / name for name in ("teacher", "student")}
    for path in models.values():
        path.mkdir()
        (path / "config.json").write_text("{}")
        os.utime(path / "config.json", (1000, 1000))
    results = tmp_path / "eval" / "results.json"
    assert not evaluation_is_current(results, models)
    results.parent.mkdir()
    results.write_text(json.dumps({"models": {"teacher": {}, "student": {}}}))
    os.utime(results, (2000, 2000))
    assert evaluation_is_current(results, models)
    assert not evaluation_is_current(results, {"teacher": models["teacher"]})
    os.utime(models["student"] / "config.json", (3000, 3000))  # retrained after the evaluation
    assert not evaluation_is_current(results, models)


def test_results_md_and_the_tokens_chart_show_the_budgets_and_the_levers(tmp_path):
    from scripts.quality import budget_table, headline, markdown, plot_budgets

    def run(kind, ce, budget=1, shards="train"):
        curve = [{"step": 0, "eval_ce": 6.0, "eval_kl": 2.0, "eval_top1": 0.1},
                 {"step": 10 * budget, "eval_ce": ce, "eval_kl": 1.0, "eval_top1": 0.4}]  # fmt: skip
        return {"kind": kind, "seed": 0, "settings": {}, "budget": budget, "shards": shards,
                "curve": curve}  # fmt: skip

    config = QualityConfig(steps=10, budgets=(1, 2), levers=("sampled",))
    lm = {
        "teacher_ce": 3.0,
        "runs": {
            "kd-seed0": run("kd", 4.6), "sft-seed0": run("sft", 5.0),
            "kd-budget2-seed0": run("kd", 4.2, 2), "sft-budget2-seed0": run("sft", 4.4, 2),
            "kd-lever-topk": run("lever", 4.5, shards="lever-topk"),
            "kd-lever-sampled": run("lever", 4.4, shards="lever-sampled"),
        },
        "stored_bytes": {"lever-topk": 250.0, "lever-sampled": 120.5},
    }  # fmt: skip
    results = {"lm": lm, "headline": headline(lm), "budgets": budget_table(lm, config)}
    text = markdown(results, config)
    assert "| 1× | 10,240 | 1 | 4.600 | 5.000 | 20.0% |" in text
    assert "≥ 20,480 | ≥ 1.00× |" in text  # KD at 2x beats SFT's best budget
    assert "| sampled | 120.5 | 4.400 | 1.000 | 0.400 | -0.100 |" in text
    assert "kd-budget2-seed0 |" not in text  # budget runs are in the budget table only
    plot_budgets(tmp_path / "chart.png", results, config)
    assert (tmp_path / "chart.png").stat().st_size > 1000
