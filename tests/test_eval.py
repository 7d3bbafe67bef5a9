"""alignprop eval / sample: fixed prompts and noise for every model, every reward scored, table + grid + gallery."""

import csv
import json
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from alignprop_core import AlignPropTrainer
from alignprop_core.errors import ConfigError
from alignprop_core.evaluate import run_eval
from alignprop_core.lora import LORA_WEIGHTS_NAME
from alignprop_core.pages import image_grid
from alignprop_core.samples import run_sample


@pytest.fixture(scope="module")
def trained(tiny_sd_path, tmp_path_factory):
    """A LoRA from a short run, plus an untrained (B = 0) LoRA that must leave the model unchanged."""
    from alignprop_core import AlignPropConfig

    root = tmp_path_factory.mktemp("eval")
    config = AlignPropConfig(pretrained_model=str(tiny_sd_path), rewards=["saturation:1", "contrast:0.5"],
                             num_epochs=2, sample_num_steps=3, train_batch_size=2, truncation="fixed", truncation_k=2,
                             train_learning_rate=5e-2, mixed_precision="no", eval_num_samples=3, save_freq=100,
                             output_dir=str(root / "tuned"))
    result = AlignPropTrainer(config).train()
    from diffusers import StableDiffusionPipeline

    from alignprop_core.lora import add_lora, save_lora

    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True).unet
    add_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])  # gaussian init: B = 0, changes nothing
    save_lora(unet, root / "zero")
    return config, result, root / "zero", root


def bare_grid(out):
    """The grid of the eval report written to ``out`` without the score lines (from its eval.json and images)."""
    document = json.loads((out / "eval.json").read_text())
    models = [model["name"] for model in document["models"]]
    images = {model: [Image.open(out / s["images"][model]) for s in document["samples"]] for model in models}
    return image_grid(models, document["samples"], images, scores=False)


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_eval_scores_base_and_loras_on_the_same_prompts_and_noise(trained, capsys):
    config, result, zero_dir, root = trained
    out = root / "report"
    report = run_eval(config, [result.output_dir, zero_dir], out_dir=out)

    # one row per model x reward (+ the weighted total, as there are two rewards)
    assert [(r["model"], r["reward"]) for r in report.rows] == [
        (m, r) for m in ("base", "tuned", "zero") for r in ("saturation", "contrast", "weighted_total")]
    # the same prompts, seeds and sampler as the trainer's own fixed-seed eval: the numbers match the run's
    means = {m: report.scores[m].means() for m in report.models}
    # (the trainer's rounds also hold diversity and image statistics: the rewards are compared)
    assert means["tuned"] == pytest.approx({k: result.eval_after[k] for k in means["tuned"]}, abs=1e-4)
    assert means["base"] == pytest.approx({k: result.eval_before[k] for k in means["base"]}, abs=1e-4)
    # same noise per prompt for every model: a LoRA that changes nothing reproduces the base images exactly
    assert torch.allclose(report.scores["zero"].images, report.scores["base"].images, atol=1e-5)
    assert not torch.allclose(report.scores["tuned"].images, report.scores["base"].images, atol=1e-3)
    zero_rows = [r for r in report.rows if r["model"] == "zero"]
    assert all(abs(r["delta_vs_base"]) < 1e-5 and r["win_rate_vs_base"] == 0 for r in zero_rows)

    printed = capsys.readouterr().out
    assert "model  reward" in printed and "weighted_total" in printed and "delta_vs_base" in printed
    with open(out / "eval.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and float(rows[3]["mean"]) == pytest.approx(report.rows[3]["mean"])
    document = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in document["models"]] == ["base", "tuned", "zero"]
    assert len(document["samples"]) == 3 and document["samples"][0]["seed"] == report.samples.seeds[0]
    assert document["samples"][0]["scores"]["tuned"]["saturation"] == pytest.approx(
        report.scores["tuned"].components["saturation"][0].item())

    # grid: a row per prompt, a column per model (128 px images, 220 px label column, 4 px gaps), each image's
    # scores under it (taller than the images alone)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 220 + 3 * 132 + 4 and grid.size[1] > 3 * 132 + 4
    assert grid.size[1] > bare_grid(out).size[1] + 3 * 3 * 13
    # the gallery shows every model's image of every prompt, and only files that exist
    parser = Images()
    parser.feed((out / "index.html").read_text())
    assert len(parser.sources) == 9 and all((out / s).is_file() for s in parser.sources)
    assert all(p in (out / "index.html").read_text() for p in report.samples.prompts)


def test_eval_with_a_prompts_file_and_the_command_line(trained, tmp_path):
    from alignprop_core.cli import main

    config, result, _, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n")
    code = main(["eval", "--pretrained_model", config.pretrained_model, "--rewards", "saturation",
                 "--sample_num_steps", "3", "--mixed_precision", "no", "--prompts_file", str(prompts),
                 "--lora", str(result.output_dir), "-o", str(tmp_path / "out"), "--batch_size", "1"])
    assert code == 0
    document = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [s["prompt"] for s in document["samples"]] == ["a red fox", "a blue bird"]
    assert [(r["model"], r["reward"]) for r in document["table"]] == [("base", "saturation"), ("tuned", "saturation")]


def test_eval_errors_come_before_loading(trained, tmp_path, capsys, monkeypatch):
    import alignprop_core.evaluate as evaluate
    from alignprop_core.cli import main

    config, _, _, _ = trained
    monkeypatch.setattr(evaluate, "load_inference_pipeline", lambda *a: pytest.fail("a model was loaded"))
    assert main(["eval", "--pretrained_model", config.pretrained_model, "--lora", str(tmp_path / "nope")]) == 2
    assert "error: LoRA folder '" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"has no {LORA_WEIGHTS_NAME}"):
        run_eval(config, [tmp_path / "empty"], out_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="eval_num_samples: got 0"):
        run_eval(config.replace(eval_num_samples=0), [], out_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="prompts file .* does not exist"):
        run_eval(config, [], out_dir=tmp_path / "out", prompts_file=tmp_path / "missing.txt")


def test_sample_writes_pngs_per_prompt_and_seed(trained, tmp_path):
    config, result, _, _ = trained
    files = run_sample(config, ["a cat", "a dog"], out_dir=tmp_path / "s", lora=result.output_dir, seed=7,
                       num_per_prompt=2)
    assert [f.name for f in files] == ["000-a_cat-seed7.png", "000-a_cat-seed8.png", "001-a_dog-seed7.png",
                                       "001-a_dog-seed8.png"]
    records = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [("a cat", 7), ("a cat", 8), ("a dog", 7), ("a dog", 8)]
    # image j uses seed + j: re-making one image alone (other batch size) gives it again, up to float rounding
    again = run_sample(config, ["a cat"], out_dir=tmp_path / "again", lora=result.output_dir, seed=8, batch_size=1)
    assert pixel_difference(again[0], files[1]) <= 1
    assert pixel_difference(again[0], files[0]) > 10  # another seed is another image
    base = run_sample(config, ["a cat"], out_dir=tmp_path / "base", seed=8)
    assert pixel_difference(base[0], files[1]) > 1  # the LoRA is applied
    off = run_sample(config, ["a cat"], out_dir=tmp_path / "off", lora=result.output_dir, lora_scale=0.0, seed=8)
    assert pixel_difference(off[0], base[0]) <= 1  # ... at the strength asked for


def test_sample_command_line(trained, tmp_path):
    from alignprop_core.cli import main

    config, result, _, _ = trained
    prompts = tmp_path / "more.txt"
    prompts.write_text("a bird\n")
    code = main(["sample", "--pretrained_model", config.pretrained_model, "--sample_num_steps", "2",
                 "--mixed_precision", "no", "--prompt", "a cat", "--prompt", "a dog", "--prompts_file", str(prompts),
                 "--seed", "3", "--lora", str(result.output_dir), "--lora_scale", "0.5", "-o", str(tmp_path / "out")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "000-a_cat-seed3.png", "001-a_dog-seed3.png", "002-a_bird-seed3.png"]
    assert main(["sample", "--pretrained_model", config.pretrained_model, "-o", str(tmp_path / "none")]) == 2


def synthetic_report(out, models=("base", "tuned"), size=32):
    """An EvalReport built from random images and scores (no pipeline): for the page and grid writers."""
    from alignprop_core import AlignPropConfig
    from alignprop_core.evaluate import EvalReport, SampleSet, Scored, table_rows

    config = AlignPropConfig(rewards=["saturation:1", "contrast:0.5"])
    generator = torch.Generator().manual_seed(0)
    samples = SampleSet(["a red fox in the snow, highly detailed, golden hour light", "a <b>blue</b> bird"],
                        [{}, {}], [11, 12])
    scores = {}
    for model in models:
        saturation, contrast = torch.rand(2, generator=generator), torch.rand(2, generator=generator)
        scores[model] = Scored(saturation + 0.5 * contrast, {"saturation": saturation, "contrast": contrast},
                               torch.rand(2, 3, size, size, generator=generator))
    return EvalReport(list(models), samples, scores, table_rows(scores, config), out), config


class Tables(HTMLParser):
    """Every <table>'s class and its rows of cell texts; also notes any <pre>."""

    def __init__(self):
        super().__init__()
        self.tables, self.pre, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.pre = True
        elif tag == "table":
            self.tables.append((dict(attrs).get("class"), []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append(self._cell.strip())
            self._cell = None


def test_eval_page_has_a_real_score_table(tmp_path):
    from alignprop_core.evaluate import write_eval_outputs

    report, config = synthetic_report(tmp_path)
    files = write_eval_outputs(report, config, {"base": None, "tuned": "/runs/tuned"})
    parser = Tables()
    parser.feed(files["html"].read_text())
    assert not parser.pre  # the table is a table, not preformatted text
    (rows,) = [rows for cls, rows in parser.tables if cls == "scores"]
    assert rows[0] == ["model", "reward", "mean", "std", "min", "max", "Δ vs base", "wins vs base"]
    assert len(rows) == 1 + len(report.rows)
    for cells, row in zip(rows[1:], report.rows):
        assert cells[:6] == [row["model"], row["reward"], f"{row['mean']:.4f}", f"{row['std']:.4f}",
                             f"{row['min']:.4f}", f"{row['max']:.4f}"]
        assert cells[6] == f"{row['delta_vs_base']:+.4f}"
        assert cells[7] == ("-" if row["win_rate_vs_base"] is None else f"{100 * row['win_rate_vs_base']:.0f}%")
    text = files["html"].read_text()
    assert "a &lt;b&gt;blue&lt;/b&gt; bird" in text and 'href="grid.png"' in text
    assert 'name="viewport"' in text and "overflow-x:auto" in text  # wide tables scroll in a narrow window


def test_eval_grid_shows_each_images_scores_in_a_readable_font(tmp_path):
    import numpy as np

    from alignprop_core.evaluate import write_eval_outputs

    report, config = synthetic_report(tmp_path)
    write_eval_outputs(report, config, {"base": None, "tuned": None})
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    bare = bare_grid(tmp_path)
    assert grid.size[1] >= bare.size[1] + 2 * 3 * 15  # three score lines under each row of images
    pixels = np.asarray(grid).astype(int)
    # under the first image of each model: dark text where the bare grid has none
    dark = (pixels.max(axis=2) < 100)
    header = dark[:30]
    rows = np.where(header.any(axis=1))[0]
    assert rows.max() - rows.min() >= 10  # model names ~11 px tall (Pillow's 10 px default font: 8 px)
    first_row_bottom = 30 + 4 + 32  # header, gap, image
    band = dark[first_row_bottom:first_row_bottom + 3 * 18, 220:]
    assert band.sum() > 200
    # the difference to the base in colour: green where better, red where worse
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 80) & (pixels[..., 2] < 110)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80)
    assert green.sum() + red.sum() > 50
    bare_pixels = np.asarray(bare).astype(int)
    assert (bare_pixels[first_row_bottom:first_row_bottom + 3 * 18, 220:].max(axis=2) < 100).sum() < band.sum() / 4


def pixel_difference(a, b):
    import numpy as np

    return int(np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)).max())


def test_eval_and_sample_create_no_folder_when_loading_fails(trained, tmp_path, monkeypatch):
    import alignprop_core.evaluate as evaluate
    import alignprop_core.samples as samples

    config, result, _, _ = trained

    def fail(*args):
        raise ConfigError("cannot load this model")

    monkeypatch.setattr(evaluate, "load_inference_pipeline", fail)
    monkeypatch.setattr(samples, "load_inference_pipeline", fail)
    with pytest.raises(ConfigError, match="cannot load"):
        run_eval(config, [result.output_dir], out_dir=tmp_path / "report" / "deep")
    with pytest.raises(ConfigError, match="cannot load"):
        run_sample(config, ["a cat"], out_dir=tmp_path / "samples")
    assert list(tmp_path.iterdir()) == []


def test_prompts_files_with_a_byte_order_mark_or_bad_records(tmp_path):
    from alignprop_core.evaluate import read_prompts_file

    (tmp_path / "bom.txt").write_bytes("\ufeffa red fox\na cat\n".encode("utf-8"))
    assert read_prompts_file(tmp_path / "bom.txt")[0] == ["a red fox", "a cat"]
    (tmp_path / "meta.jsonl").write_text('{"prompt": "a fox", "metadata": 3}\n')
    with pytest.raises(ConfigError, match=r"meta.jsonl:1: 'metadata' must be a JSON object, got 3"):
        read_prompts_file(tmp_path / "meta.jsonl")
    (tmp_path / "gap.jsonl").write_text('{"prompt": "a fox"}\n\n{"prompt": ""}\n')
    with pytest.raises(ConfigError, match=r"gap.jsonl:3: 'prompt' must be a non-empty string"):  # real line numbers
        read_prompts_file(tmp_path / "gap.jsonl")


def test_sample_and_eval_replace_earlier_outputs_only_when_asked(trained, tmp_path):
    config, result, _, _ = trained
    first = run_sample(config, ["a cat"], out_dir=tmp_path / "s", lora=result.output_dir)
    with_lora = first[0].read_bytes()
    with pytest.raises(ConfigError, match="already holds 000-a_cat-seed0.png from an earlier run"):
        run_sample(config, ["a cat"], out_dir=tmp_path / "s")
    assert first[0].read_bytes() == with_lora
    run_sample(config, ["a cat"], out_dir=tmp_path / "s", seed=1)  # other names: nothing is replaced
    assert run_sample(config, ["a cat"], out_dir=tmp_path / "s", overwrite=True) == first
    assert first[0].read_bytes() != with_lora  # the base model's image replaced the LoRA's
    assert len((tmp_path / "s" / "samples.jsonl").read_text().splitlines()) == 3
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "eval.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds eval.json"):
        run_eval(config, [], out_dir=tmp_path / "e")
