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
    config = QualityConfig(seeds=2, ablations=("alpha=0", "alpha=0.5", "loss=rkl"))
    runs = lm_runs(config)
    assert list(runs) == ["kd-seed0", "sft-seed0", "kd-seed1", "sft-seed1", "kd-alpha=0",
                          "kd-loss=rkl"]  # fmt: skip
    assert runs["kd-loss=rkl"]["settings"] == {**config.recipe, "loss": "rkl"}
    assert runs["sft-seed1"] == {"kind": "sft", "seed": 1, "settings": {"loss": "ce"}}


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
