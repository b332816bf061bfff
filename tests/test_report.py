"""The run report: one offline HTML page whose numbers are metrics.json's."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from PIL import Image

from microfed.training.report import SECTION_IDS, render_report, write_report

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(
    classes: list[str] | None = None,
    shards: int = 3,
    rounds: int = 4,
    epochs: int = 2,
    alpha: float | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """metrics.json, dataset.json and the worker records of a plausible run, built the way the steps build them."""
    classes = list(classes or FASHION)
    rng = np.random.default_rng(seed)
    c = len(classes)
    if alpha is None:  # stratified: equal class counts everywhere
        hist = np.full((shards, c), 120)
    else:  # label skew: per class, shard proportions from Dirichlet(alpha)
        hist = np.stack([rng.multinomial(600, rng.dirichlet([alpha] * shards)) for _ in range(c)], axis=1)
        hist[:, 0] += 1  # no empty shard
    dataset = {
        "dataset": "fashion-mnist",
        "class_names": classes,
        "image_shape": [1, 28, 28],
        "mean": [0.2860405969887955],
        "std": [0.35302424451492254],
        "split": {"split": "dirichlet" if alpha else "stratified", "seed": seed, "alpha": alpha or 0.5},
        "num_train_examples": int(hist.sum()),
        "num_test_examples": 100 * c,
        "shards": [
            {"num_examples": int(h.sum()), "class_histogram": [int(v) for v in h], "file": f"shard-{i:05d}"}
            for i, h in enumerate(hist)
        ],
        "seconds": 1.0141938760000357,
    }
    workers = []
    for k in range(shards):
        recs = []
        for r in range(1, rounds + 1):
            eps = [
                {
                    "loss": float(0.9 / (r + e / epochs) + 0.01 * k),
                    "accuracy": float(min(0.99, 0.7 + 0.05 * r + 0.01 * e - 0.004 * k)),
                    "examples": int(hist[k].sum()),
                    "seconds": 3.5,
                }
                for e in range(1, epochs + 1)
            ]
            rec: dict[str, Any] = {"round": r, "epochs": eps}
            if r < rounds:
                rec.update(test_accuracy=0.8 + 0.02 * r, test_loss=0.5 / r)
            recs.append(rec)
        workers.append({"rank": k, "n_k": int(hist[k].sum()), "rounds": recs, "seconds": 60.5 + k, "threads": 1})
    confusion = np.zeros((c, c), dtype=int)
    for i in range(c):
        right = int(rng.integers(70, 99))
        confusion[i, i] = right
        confusion[i, (i + 1) % c] = 100 - right
    total = int(confusion.sum())
    accuracy = float(np.trace(confusion) / total)
    metrics = {
        "accuracy": accuracy,
        "loss": 0.23093217163085938,
        "class_names": classes,
        "per_class_accuracy": {n: float(confusion[i, i] / confusion[i].sum()) for i, n in enumerate(classes)},
        "confusion_matrix": confusion.tolist(),
        "num_test_examples": total,
        "shard_sizes": [s["num_examples"] for s in dataset["shards"]],
        "shard_class_histograms": [s["class_histogram"] for s in dataset["shards"]],
        "round_accuracy": [r["test_accuracy"] for r in workers[0]["rounds"][:-1]] + [accuracy],
        "train_loss": [[r["epochs"][-1]["loss"] for r in w["rounds"]] for w in workers],
        "resource_plan": None,
        "timings": {"split": 1.01, "train": 113.72987607499999, "aggregate": 0.0207, "evaluate": 2.21},
    }
    return metrics, dataset, workers


CONFIG = {"dataset": "fashion-mnist", "model": "cnn-fmnist", "workers": 3, "rounds": 4, "local_epochs": 2, "lr": 0.003}


class Page(HTMLParser):
    """Text of each section (by id), the images' sources, and every tag seen."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.tags: set[str] = set()
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self._current = a["id"]
            self.sections[str(a["id"])] = ""
        if tag == "img":
            self.images.append(str(a["src"]))
        if tag in ("td", "th", "p", "div") and self._current:
            self.sections[self._current] += " | "

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current:
            self.sections[self._current] += data


def cells(text: str) -> list[str]:
    return [c.strip() for c in text.split("|")]


@pytest.fixture(scope="module")
def run() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    return fake_run()


@pytest.fixture(scope="module")
def page(run: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]) -> str:
    metrics, dataset, workers = run
    return render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)


def test_every_section_is_present_once_in_order(page: str) -> None:
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == list(SECTION_IDS)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_every_image_is_an_embedded_png(page: str) -> None:
    images = Page(page).images
    assert len(images) == 4  # split audit, rounds, global vs micro, confusion matrix
    for src in images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and 300 <= im.width <= 1400 and 150 <= im.height <= 1200


def test_the_page_needs_no_network_and_runs_no_script(page: str) -> None:
    parsed = Page(page)
    assert "http://" not in page and "https://" not in page
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the page's own CSP forbids fetching anything


def test_numbers_equal_the_metrics(page: str, run: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]) -> None:
    metrics, _, _ = run
    s = Page(page).sections
    summary = cells(s["summary"])
    assert f"{metrics['accuracy']:.4f}" in summary and f"{metrics['loss']:.4f}" in summary
    assert f"{sum(metrics['shard_sizes']):,}" in summary and f"{metrics['num_test_examples']:,}" in summary
    split = cells(s["split-audit"])
    for i, hist in enumerate(metrics["shard_class_histograms"]):
        row = split[split.index(str(i)) :]  # the shard's table row: shard, n_k, weight, classes, counts...
        assert row[1] == f"{metrics['shard_sizes'][i]:,}"
        assert row[4 : 4 + len(hist)] == [f"{v:,}" for v in hist]
    rounds = cells(s["rounds"])
    for r, acc in enumerate(metrics["round_accuracy"], start=1):
        row = rounds[rounds.index(str(r)) :]
        assert row[1] == f"{acc:.4f}"
        assert row[3 : 3 + len(metrics["train_loss"])] == [f"{w[r - 1]:.4f}" for w in metrics["train_loss"]]
    confusion = cells(s["confusion-matrix"])
    for i, (name, acc) in enumerate(metrics["per_class_accuracy"].items()):
        row = confusion[confusion.index(name) :]
        assert row[1:4] == [
            f"{sum(metrics['confusion_matrix'][i]):,}",
            str(metrics["confusion_matrix"][i][i]),
            f"{acc:.4f}",
        ]
    comparison = cells(s["global-vs-micro"])
    assert f"{metrics['accuracy']:.4f}" in comparison
    assert {f"{w[-1]:.4f}" for w in metrics["train_loss"]} <= set(comparison)
    timings = cells(s["timings"])
    assert "113.7 s (1 min 54 s)" in timings and "0.02 s" in timings


def test_micro_models_without_test_accuracy_are_compared_honestly(page: str) -> None:
    text = Page(page).sections["global-vs-micro"]
    assert "not evaluated on the test set" in text and "not a like-for-like comparison" in text
    assert "best" in cells(text) and "worst" in cells(text)


def test_micro_model_test_accuracy_is_used_when_the_metrics_have_it() -> None:
    metrics, dataset, workers = fake_run()
    metrics["micro_model_accuracy"] = [0.8111, 0.8333, 0.7999]
    text = Page(render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)).sections["global-vs-micro"]
    row = cells(text)
    assert "ranked by test accuracy" in text and "not a like-for-like" not in text
    assert row[row.index("micro-model 1") :][2] == "0.8333" and row[row.index("micro-model 1") :][5] == "best"
    assert row[row.index("micro-model 2") :][5] == "worst"
    summary = Page(render_report(metrics, config=CONFIG, workers=workers)).sections["summary"]
    assert f"micro-models score 0.7999 to 0.8333; the global model {metrics['accuracy']:.4f}" in summary


def test_strings_from_the_run_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    metrics, dataset, workers = fake_run(classes=[*FASHION[:2], evil])
    dataset["dataset"] = '"><img src=x onerror=alert(2)>'
    page = render_report(metrics, config={**CONFIG, "note": "<b>bold</b>"}, dataset=dataset, workers=workers)
    assert "<script" not in page and "<b>" not in page and "<img src=x" not in page
    assert html.escape(evil) in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert evil in Page(page).sections["split-audit"]  # shown as text, exactly


def test_math_and_unicode_class_names_are_drawn_literally() -> None:
    names = ["$x^2$", "under_score", "naïve 猫", "a" * 60]
    metrics, dataset, workers = fake_run(classes=names)
    page = render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)
    assert html.escape("$x^2$") in page and "naïve 猫" in page


def test_local_run_without_a_plan_says_so_and_a_plan_is_a_table(
    run: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]],
) -> None:
    metrics, dataset, workers = run
    local = Page(render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)).sections
    assert "Local run: no plan" in local["resource-plan"]
    plan = {
        "accelerator": "none",
        "cpu_request": 2.25,
        "memory_request": 3 * 1024**3,
        "estimate": {"shard_bytes": 4096},
    }
    text = Page(render_report(metrics, config=CONFIG, workers=workers, plan=plan)).sections["resource-plan"]
    assert {"cpu_request", "2.25", "memory_request", "3,221,225,472 (3.0 GiB)", "estimate.shard_bytes"} <= set(
        cells(text)
    )


def test_metrics_alone_are_enough() -> None:
    metrics, _, _ = fake_run()
    metrics["round_accuracy"] = metrics["round_accuracy"][-1:]  # per-round evaluation off
    parsed = Page(render_report(metrics, config={}))
    assert list(parsed.sections) == list(SECTION_IDS)
    assert "No worker records" in parsed.sections["rounds"]
    assert "not evaluated after every round" in parsed.sections["rounds"]
    assert "No configuration was recorded" in parsed.sections["configuration"]
    rows = cells(parsed.sections["rounds"])
    assert rows[rows.index("4") :][1] == f"{metrics['accuracy']:.4f}"


def test_ten_classes_and_eight_skewed_shards_stay_light() -> None:
    metrics, dataset, workers = fake_run(shards=8, rounds=6, epochs=3, alpha=0.1, seed=3)
    page = render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)
    assert len(page.encode()) < 400_000
    assert "Classes missing from a shard" in page  # alpha=0.1 leaves shards without some classes


def test_rendering_leaves_matplotlib_state_alone(
    run: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]],
) -> None:
    backend, parse_math = matplotlib.get_backend(), matplotlib.rcParams["text.parse_math"]
    render_report(run[0], config=CONFIG)
    assert matplotlib.get_backend() == backend and matplotlib.rcParams["text.parse_math"] == parse_math


def test_write_report_writes_the_whole_page(tmp_path: Path, page: str) -> None:
    path = tmp_path / "run" / "report.html"
    write_report(path, page)
    assert path.read_text(encoding="utf-8") == page
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind


def test_a_real_metrics_file_round_trips(
    tmp_path: Path, run: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]
) -> None:
    """What `microfed run` does: metrics.json read back (floats through JSON) gives the same numbers."""
    metrics, dataset, workers = run
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    loaded = json.loads((tmp_path / "metrics.json").read_text())
    assert render_report(loaded, config=CONFIG, dataset=dataset, workers=workers) == render_report(
        metrics, config=CONFIG, dataset=dataset, workers=workers
    )


@pytest.mark.integration
def test_the_report_of_a_real_run_shows_its_metrics_json(tmp_path: Path, shapes_zip: Path) -> None:
    """The steps on a small zip (two local workers), then the report from the files they wrote."""
    from microfed.training.io import read_json
    from microfed.training.shards import SplitConfig
    from microfed.training.step_aggregate import aggregate_step
    from microfed.training.step_evaluate import evaluate_step
    from microfed.training.step_split import SplitOptions, split_step
    from microfed.training.step_train import train_step
    from microfed.training.train import OptimConfig
    from microfed.training.worker import WorkerConfig

    shards, micro, model, out = (tmp_path / d for d in ("shards", "micro", "model", "eval"))
    split_step(SplitOptions(source=str(shapes_zip)), SplitConfig(workers=2, seed=3, val_fraction=0.2), shards)
    cfg = WorkerConfig(
        local_epochs=1,
        shards=str(shards),
        out=str(micro),
        model="cnn-small",
        rounds=2,
        optim=OptimConfig(batch_size=16),
    )
    train_step(cfg, 2)
    aggregate_step(micro, model, shards)
    evaluate_step(model, shards, micro, out)

    metrics, job = read_json(out / "metrics.json"), read_json(micro / "job.json")
    page = render_report(
        metrics, config=CONFIG, dataset=read_json(shards / "dataset.json"), workers=job["workers"], plan=job["plan"]
    )
    s = Page(page).sections
    assert f"{metrics['accuracy']:.4f}" in cells(s["summary"])
    split = cells(s["split-audit"])
    assert [split[split.index(str(i)) + 1] for i in (0, 1)] == [f"{n:,}" for n in metrics["shard_sizes"]]
    assert f"{metrics['per_class_accuracy']['triangle']:.4f}" in cells(s["confusion-matrix"])
    rows = cells(s["rounds"])
    starts = [next(j for j, c in enumerate(rows) if c.split(" ")[0] == str(i)) for i in (1, 2)]
    # per-round accuracy on the validation split, the kept round marked
    assert [f"{a:.4f}" for a in metrics["round_accuracy"]] == [rows[j + 1] for j in starts]
    assert rows[starts[metrics["selected_round"] - 1]].endswith("(kept)")
    assert "global validation accuracy" in rows
    # the workers' measured peaks against the plan a cluster run would get
    usage = cells(s["resource-plan"])
    assert [c for c in usage if c.startswith("worker ")] == ["worker 0", "worker 1"]
    peaks = metrics["resource_usage"]["replicas"]
    assert all(p["memory_peak_bytes"] > 50 * 2**20 for p in peaks)  # a Python process with torch loaded
    assert len(Page(page).images) == 4


def test_a_class_without_test_images_has_no_accuracy_and_no_weight_in_the_mean() -> None:
    """evaluate() on a test set without class 2: its accuracy is None (not 0.0), the macro mean leaves it out."""
    import torch
    from torch import nn

    from microfed.training.evaluation import evaluate, macro_average
    from microfed.training.train import Preprocess

    class FirstPixel(nn.Module):  # predicts the class stored in the first pixel
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 3).float()

    labels = torch.tensor([0, 0, 1, 1])
    predicted = torch.tensor([0, 1, 1, 1])
    images = predicted.view(-1, 1, 1, 1).to(torch.uint8).expand(-1, 1, 2, 2).contiguous()
    pre = Preprocess([0.0], [1 / 255], torch.device("cpu"))
    res = evaluate(FirstPixel(), images, labels, preprocess=pre, num_classes=3)
    assert res.per_class_accuracy == [0.5, 1.0, None]
    assert res.macro_accuracy == pytest.approx(0.75)  # (0.5 + 1.0) / 2, not (0.5 + 1.0 + 0) / 3
    assert res.accuracy == pytest.approx(0.75) and res.confusion_matrix[2] == [0, 0, 0]
    assert macro_average([None, None]) is None


def run_without_test_images_of(cls: int) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    metrics, dataset, workers = fake_run()
    matrix = metrics["confusion_matrix"]
    matrix[cls] = [0] * len(matrix)
    name = metrics["class_names"][cls]
    metrics["per_class_accuracy"][name] = None
    known = [a for a in metrics["per_class_accuracy"].values() if a is not None]
    metrics["macro_accuracy"] = sum(known) / len(known)
    metrics["classes_without_test_images"] = [name]
    return metrics, dataset, workers


def test_a_class_without_test_images_shows_as_such_not_as_the_weakest() -> None:
    metrics, dataset, workers = run_without_test_images_of(3)  # "Dress"
    s = Page(render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)).sections
    confusion = cells(s["confusion-matrix"])
    assert confusion[confusion.index("Dress") :][1:4] == ["0", "0", "no test images"]
    summary = s["summary"]
    assert "No test images for 1 of 10 classes: Dress" in summary and "leave them out" in summary
    assert "Weakest class: Dress" not in summary and "strongest: Dress" not in summary
    shown = cells(summary)
    assert shown[shown.index("Mean class accuracy") + 1] == f"{metrics['macro_accuracy']:.4f}"


def test_skipped_images_are_counted_and_named_on_the_first_screen() -> None:
    metrics, dataset, workers = fake_run()
    dataset["num_skipped_files"] = 1203
    metrics["skipped_images"] = {  # as the evaluate step writes it: names escaped with `printable`
        "total": 1203,
        "train": 998,
        "test": 2,
        "unlisted": 203,
        "examples": [
            {"split": "train", "file": "train/Bag/evil\\x1b[31m.png", "reason": "cannot decode image <b>x</b>"},
            {"split": "test", "file": "test/Coat/big.png", "reason": "test/Coat/big.png is 90,000,000 pixels"},
        ],
    }
    page = render_report(metrics, config=CONFIG, dataset=dataset, workers=workers)
    s = Page(page).sections
    summary = cells(s["summary"])
    assert summary[summary.index("Skipped images") + 1] == "1,203"
    note = next(c for c in summary if c.startswith("1,203 image file(s) could not be read"))
    assert "train 998, test 2, 203 not listed by name" in note
    assert "train/Bag/evil\\x1b[31m.png: cannot decode image <b>x</b>" in note  # the file leads a reason without it
    assert "; test/Coat/big.png is 90,000,000 pixels." in note  # a reason naming its file stands alone
    assert "\x1b" not in page and "<b>x" not in page
    assert "1,203" in cells(s["configuration"])  # the dataset table's count, from the manifest
    # nothing skipped: no card, no note
    clean = Page(render_report(*fake_run()[:1], config=CONFIG)).sections["summary"]
    assert "Skipped images" not in clean and "could not be read" not in clean
